"""Train a Diff3R model (hydra). Configs: ``examples/diff3r/conf``.

Modes (``mode=``): ``zero_shot`` (plain feed-forward), ``diff3r`` (through the TTO
layer, implicit backward), ``unrolled`` (through the layer, backprop through the
inner steps), ``no_uncertainty`` (through the layer, Λ a constant).

Examples::

    python examples/diff3r/train.py mode=zero_shot steps=300
    python examples/diff3r/train.py mode=diff3r steps=100 init_from=outputs/diff3r/zero_shot/checkpoint.pt
    python examples/diff3r/train.py mode=diff3r resume=true           # continue an interrupted run
    python examples/diff3r/train.py data.root=/path/to/re10k data=re10k  # real RE10K chunks

Writes ``out_dir/checkpoint.pt`` (atomically), ``out_dir/metrics.jsonl`` (one JSON
line per logged step: loss, PSNR, backward PCG iterations and failures, forward
stationarity, mean Λ per group), the same numbers and target/render images to
TensorBoard in ``out_dir/tensorboard/`` (``tensorboard=false`` turns it off) and
``out_dir/config.yaml``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, "") and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402
from tqdm import tqdm  # noqa: E402

import difftto  # noqa: E402
from examples.diff3r import distributed, pose_free  # noqa: E402
from examples.diff3r.data import BoundedViewSampler, RE10KDataset, generate_dataset  # noqa: E402
from examples.diff3r.data.augment import augment_context  # noqa: E402
from examples.diff3r.metrics import load_lpips, lpips_distance, psnr  # noqa: E402
from examples.diff3r.model import GROUPS, Diff3RModel  # noqa: E402
from examples.diff3r.pipeline import build_layer, render_views, run_pipeline  # noqa: E402
from examples.diff3r.tensorboard_log import TensorBoardLog  # noqa: E402

__all__ = [
    "CHECKPOINT_NAME",
    "batch_indices",
    "build_model",
    "compose_config",
    "load_checkpoint",
    "make_dataset",
    "prepare_data",
    "save_checkpoint",
    "train",
]

CHECKPOINT_NAME = "checkpoint.pt"
CONF_DIR = Path(__file__).resolve().parent / "conf"


def compose_config(overrides: list[str]) -> DictConfig:
    """The training config of ``conf/config.yaml`` with hydra ``overrides`` (hydra's
    compose API: for scripts and tests that call :func:`train` directly)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)
MODES = ("zero_shot", "diff3r", "unrolled", "no_uncertainty")
NAN_POLICIES = ("stop", "skip")


# ----------------------------------------------------------------------------- data


def prepare_data(data_cfg: Any) -> Path:
    """The dataset root: ``data.root`` if set (generated there first when it lacks
    ``train/`` and ``data.generate`` is set), else a cache folder named after the
    generator settings, generated on first use."""
    gen = data_cfg.get("generate")
    gen = OmegaConf.to_container(gen, resolve=True) if isinstance(gen, DictConfig) else gen
    root = data_cfg.get("root")
    if root:
        root = Path(root)
        if (root / "train").is_dir() or (root / "test").is_dir():
            return root
        if not gen:
            raise FileNotFoundError(f"data.root={str(root)!r}: no train/ or test/ folder of RE10K chunks there")
    else:
        if not gen:
            raise ValueError("data.root is null and data.generate is null: give a dataset root or generator settings")
        cache = data_cfg.get("cache_dir")
        if not cache:
            raise ValueError("data.cache_dir: expected a folder for the generated dataset, got null")
        name = (f"procedural_n{gen['n_train']}-{gen['n_test']}_v{gen['views_per_scene']}"
                f"_px{gen['image_size']}_seed{gen['seed']}")
        root = Path(cache) / name
    start = time.perf_counter()
    fresh = not (root / "meta.json").is_file()
    generate_dataset(
        root, int(gen["n_train"]), int(gen["n_test"]), int(gen["views_per_scene"]), int(gen["image_size"]),
        int(gen["seed"]), workers=int(gen.get("workers", 1)),
    )
    if fresh:
        print(f"[data] generated {gen['n_train']} train + {gen['n_test']} test scenes in {root} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    return root


def make_dataset(cfg: Any, root: Path, split: str, *, evaluation: bool = False,
                 load_depth: bool = False) -> RE10KDataset:
    """The train (random bounded views) or test (``evaluation_index.json``) dataset."""
    d = cfg.data
    index = None
    if evaluation:
        index = root / "evaluation_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{index}: the evaluation index of the test split is missing")
    gap = list(d.get("gap", [3, 8]))
    sampler = BoundedViewSampler(int(d.get("num_context_views", 2)), int(d.get("num_target_views", 3)),
                                 min_gap=int(gap[0]), max_gap=int(gap[1]))
    return RE10KDataset(
        root, split, int(d.image_size), sampler=sampler, evaluation_index=index,
        near=d.get("near"), far=d.get("far"), make_baseline_1=bool(d.get("make_baseline_1", False)),
        load_depth=load_depth, seed=int(cfg.seed),
    )


def batch_indices(num_items: int, batch_size: int, seed: int, step: int) -> tuple[list[int], int]:
    """Scene indices of training ``step`` and its epoch: a seeded permutation per
    epoch, walked in order, so a resumed run sees the same batches."""
    if num_items < 1:
        raise ValueError(f"num_items: the training split is empty (got {num_items} scenes)")
    per_epoch = max(1, num_items // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    picked = [perm[(pos * batch_size + k) % num_items] for k in range(batch_size)]
    return picked, epoch


def fetch_batch(dataset: RE10KDataset, indices: list[int], epoch: int, device: torch.device) -> dict:
    """Collate the samples at ``indices`` (views drawn for ``epoch``) onto ``device``."""
    dataset.set_epoch(epoch)
    batch = default_collate([dataset[i] for i in indices])
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


# ---------------------------------------------------------------------------- model


def build_model(model_cfg: Any) -> Diff3RModel:
    """The encoder from a ``model`` config (``conf/model/*.yaml``)."""
    m = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    if pose_free.is_pose_free(m):  # model=pose_free: the pose-free variant (examples/diff3r/pose_free.py)
        return pose_free.PoseFreeModel(**m)
    return Diff3RModel(**m)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over
    ``path``: a crash leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (on CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or overwritten files raise many exception types
        raise ValueError(
            f"checkpoint {path}: cannot be read ({type(exc).__name__}: {exc}); the file is corrupt or "
            "truncated (save_checkpoint writes atomically, so it was damaged afterwards): restore it "
            "or delete it to start over"
        ) from exc
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path}: holds a {type(state).__name__}, expected a dict")
    for key in ("model", "step", "config"):
        if key not in state:
            raise ValueError(f"checkpoint {path}: missing {key!r}; not a Diff3R training checkpoint")
    return state


def model_from_checkpoint(path: str | os.PathLike) -> tuple[Diff3RModel, dict]:
    """The model (eval mode) stored in a training checkpoint, and the checkpoint."""
    state = load_checkpoint(path)
    model = build_model(state["config"]["model"])
    model.load_state_dict(state["model"])
    return model.eval(), state


# --------------------------------------------------------------------------- train


def _mean(t: torch.Tensor) -> float:
    return float(t.detach().float().mean())


def _step_log(step, loss, out, batch, seconds, through_layer) -> dict:
    rec = {
        "step": step,
        "loss": float(loss),
        "psnr": _mean(psnr(out.render.detach(), batch["target_images"])),
        "seconds": round(seconds, 3),
    }
    if out.lam is not None:
        for g in GROUPS:
            rec[f"lam_{g}"] = _mean(out.lam[g])
    if through_layer and out.info is not None:
        fwd = out.info.forward
        rec["stationarity_mean"] = _mean(fwd.stationarity)
        rec["stationarity_max"] = float(fwd.stationarity.max())
        rec["inner_objective_ratio"] = _mean(fwd.objective / fwd.initial_objective.clamp_min(1e-12))
        if out.info.backward is not None:
            b = out.info.backward
            rec["pcg_iterations_mean"] = _mean(b.iterations)
            rec["pcg_iterations_max"] = int(b.iterations.max())
            rec["pcg_failures"] = b.failures
            rec["pcg_residual_max"] = float(b.relative_residual.max())
    return rec


def _non_finite(loss: float, grad_norm: float) -> str | None:
    """What is non-finite in a step (``None``: nothing)."""
    if not math.isfinite(loss):
        return f"loss ({loss})"
    if not math.isfinite(grad_norm):
        return f"gradient (norm {grad_norm})"
    return None


def lr_schedule(steps: int, warmup: int = 0, final: float | None = None, decay_from: int = 0):
    """The factor on the configured ``lr`` at optimizer step ``s`` (0-based), as a function
    for ``LambdaLR``: a linear warm-up over ``warmup`` steps, then constant, or with
    ``final`` (a fraction of ``lr``) a cosine decay from step ``decay_from`` down to
    ``final`` at step ``steps``. The factor depends on ``steps``: a run resumed with a
    larger ``steps`` continues on the longer schedule.

    Raises:
        ValueError: ``final`` outside [0, 1], or ``decay_from`` not in [0, steps).
    """
    warmup = max(1, int(warmup))
    if final is not None:
        final = float(final)
        if not 0.0 <= final <= 1.0:
            raise ValueError(f"lr_final must be a fraction of lr in [0, 1] (or null for a constant lr), got {final}")
        if not 0 <= decay_from < steps:
            raise ValueError(f"lr_decay_from must be a step in [0, steps={steps}), got {decay_from}")

    def factor(s: int) -> float:
        f = min(1.0, (s + 1) / warmup)
        if final is not None and s > decay_from:
            t = min(1.0, (s - decay_from) / (steps - decay_from))
            f *= final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))
        return f

    return factor


def train(cfg: DictConfig) -> dict:
    """Train as ``cfg`` says; returns a summary (out_dir, checkpoint, last logged record, seconds)."""
    mode = cfg.mode
    if mode.name not in MODES:
        raise ValueError(f"mode.name: expected one of {MODES}, got {mode.name!r}")
    torch.set_num_threads(int(cfg.threads))
    device = torch.device(cfg.get("device", "cpu"))
    dctx = distributed.setup(device)  # several processes under torchrun; one otherwise
    if dctx.enabled and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dctx.rank)))
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME
    metrics_path = out_dir / "metrics.jsonl" if dctx.is_main else Path(os.devnull)
    if dctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        root = prepare_data(cfg.data)  # rank 0 generates; the others wait for it
    dctx.barrier()
    if not dctx.is_main:
        root = prepare_data(cfg.data)
    # model=pose_free with model.depth_supervision > 0: the training views' depths too
    depth_supervised = pose_free.is_pose_free(cfg.model) and float(cfg.model.get("depth_supervision", 0.0)) > 0
    dataset = make_dataset(cfg, root, "train", load_depth=depth_supervised)
    torch.manual_seed(int(cfg.seed))  # the same initial weights on every rank
    core = build_model(cfg.model).to(device)
    model = dctx.wrap(core, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(cfg.lr))
    schedule = lr_schedule(int(cfg.steps), int(cfg.get("lr_warmup", 0)), cfg.get("lr_final"),
                           int(cfg.get("lr_decay_from") or 0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    is_pose_free = pose_free.is_pose_free(cfg.model)  # poses in θ, cameras in the first context view's frame
    if is_pose_free and mode.through_layer:
        layer = pose_free.build_layer(cfg.tto, mode.backward, float(cfg.model.tto_pose_lr))
    else:
        layer = build_layer(cfg.tto, mode.backward) if mode.through_layer else None
    lam = "predicted" if mode.lam == "predicted" else OmegaConf.to_container(cfg.model.lam_init, resolve=True)

    lpips_module = None
    if float(cfg.loss.get("lpips", 0.0)) > 0:
        lpips_module, message = load_lpips(cfg.loss.get("lpips_checkpoint"))
        print(f"[loss] {message}" + ("; training without the LPIPS term" if lpips_module is None else ""),
              flush=True)
        if lpips_module is not None:
            lpips_module = lpips_module.to(device)

    start_step = 0
    if cfg.resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
        print(f"[train] resumed from {ckpt_path} at step {start_step}", flush=True)
        if dctx.is_main and metrics_path.is_file():  # drop records logged after the checkpoint
            kept = [ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step]
            metrics_path.write_text("".join(ln + "\n" for ln in kept))
    else:
        if cfg.resume:
            print(f"[train] resume=true but {ckpt_path} does not exist: starting from step 0", flush=True)
        if cfg.get("init_from"):
            init = load_checkpoint(cfg.init_from)
            core.load_state_dict(init["model"])
            print(f"[train] model initialized from {cfg.init_from} (its step {init['step']})", flush=True)
        if dctx.is_main and metrics_path.is_file():
            metrics_path.unlink()

    def checkpoint(step: int) -> None:
        if not dctx.is_main:
            return
        save_checkpoint(ckpt_path, {
            "model": core.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "mode": mode.name,
            "config": OmegaConf.to_container(cfg, resolve=True),
        })

    steps = int(cfg.steps)
    nan_policy = str(cfg.get("nan_policy", "stop"))
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy: expected one of {NAN_POLICIES}, got {nan_policy!r}")
    skipped: list[dict] = []  # steps whose loss or gradient was non-finite (nan_policy=skip)
    last: dict = {}
    failures = [0, 0]  # backward solves that did not reach pcg_rtol, solves in all (this session)
    started = time.perf_counter()
    model.train()
    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, desc=f"train[{mode.name}]",
               disable=not (cfg.get("progress", True) and dctx.is_main), dynamic_ncols=True)
    board = TensorBoardLog(out_dir / "tensorboard", bool(cfg.get("tensorboard", True)) and dctx.is_main,
                           int(cfg.get("tensorboard_image_every", 50)))
    with open(metrics_path, "a") as log:
        for step in bar:
            t0 = time.perf_counter()
            # One global batch of world × batch_size scenes; each rank takes its slice.
            indices, epoch = batch_indices(len(dataset), int(cfg.batch_size) * dctx.world, int(cfg.seed), step)
            indices = dctx.shard(indices)
            batch = fetch_batch(dataset, indices, epoch, device)
            if is_pose_free:
                batch = pose_free.first_view_frame(batch)
            context_images = augment_context(batch["context_images"], cfg.get("augment"), int(cfg.seed), step)
            out = (pose_free.run_pipeline if is_pose_free else run_pipeline)(model, batch, layer, lam=lam,
                                                                             context_images=context_images)
            target = batch["target_images"]
            loss = float(cfg.loss.mse) * F.mse_loss(out.render, target)
            theta0_weight = float(cfg.loss.get("theta0", 0.0))
            if layer is not None and theta0_weight > 0:  # keep Θ0 itself a usable feed-forward prediction
                loss = loss + theta0_weight * F.mse_loss(render_views(out.prediction.theta, batch), target)
            if is_pose_free and float(cfg.model.get("pose_supervision", 0.0)) > 0:  # optional term on the poses
                loss = loss + float(cfg.model.pose_supervision) * pose_free.pose_loss(out.prediction, batch)
            if is_pose_free and layer is not None and core.pose_supervision_refined > 0:  # on the refined poses Θ*
                loss = loss + core.pose_supervision_refined * pose_free.refined_pose_loss(out, batch)
            if is_pose_free and core.depth_agreement > 0:  # predicted depths agree across the true poses
                loss = loss + core.depth_agreement * pose_free.depth_agreement_loss(
                    out.prediction, batch, form=core.depth_agreement_form, one_sided=core.depth_agreement_one_sided,
                    contrast=core.depth_agreement_contrast)
            if is_pose_free and core.depth_supervision > 0:  # training views' depths (data with depth)
                loss = loss + core.depth_supervision * pose_free.depth_loss(
                    out.prediction, batch, core.depth_supervision_scale_invariance)
            if lpips_module is not None:
                loss = loss + float(cfg.loss.lpips) * lpips_distance(lpips_module, out.render, target).mean()
            optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                # Non-converged backward solves are counted per step (pcg_failures) and in total.
                warnings.simplefilter("ignore", difftto.solvers.LinearSolveWarning)
                loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.grad_clip)))
            done = step + 1
            problem = _non_finite(loss.item(), grad_norm)
            if problem is not None:  # never written into the weights or Adam's moments
                optimizer.zero_grad(set_to_none=True)
                keys = list(batch["key"])
                message = f"step {done}: non-finite {problem} on scene(s) {keys}"
                if nan_policy == "stop":
                    raise FloatingPointError(f"{message}; lower lr or check the data (nan_policy=skip skips "
                                             "such batches)")
                skipped.append({"step": done, "problem": problem, "keys": keys})
                tqdm.write(f"[{mode.name}] {message}: batch skipped (nan_policy=skip)", file=sys.stderr)
                rec = {"step": done, "skipped": True, "problem": problem, "keys": keys,
                       "skipped_total": len(skipped), "seconds": round(time.perf_counter() - t0, 3)}
                if dctx.is_main:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                if done % int(cfg.checkpoint_every) == 0 or done == steps:
                    checkpoint(done)
                continue
            optimizer.step()
            scheduler.step()
            rec = _step_log(done, loss.item(), out, batch, time.perf_counter() - t0, layer is not None)
            if is_pose_free:
                rec.update(pose_free.pose_errors_deg(out, batch))
            if "pcg_failures" in rec:
                failures[0] += rec["pcg_failures"]
                failures[1] += int(out.info.backward.status.numel())
                rec["pcg_failures_total"] = failures[0]
            last = rec
            bar.set_postfix(loss=f"{rec['loss']:.4f}", psnr=f"{rec['psnr']:.2f}")
            if dctx.is_main and (done % int(cfg.log_every) == 0 or done == steps or done == start_step + 1):
                log.write(json.dumps(rec) + "\n")
                log.flush()
                board.record(rec, out.render, batch["target_images"])
                extra = ""
                if "pcg_iterations_mean" in rec:
                    extra = (f" | PCG it {rec['pcg_iterations_mean']:.1f} fail {rec['pcg_failures']}"
                             f" | stationarity {rec['stationarity_mean']:.2f}")
                elif "stationarity_mean" in rec:
                    extra = f" | stationarity {rec['stationarity_mean']:.2f}"
                tqdm.write(f"[{mode.name}] step {done:5d} loss {rec['loss']:.5f} psnr {rec['psnr']:.2f}"
                           f" ({rec['seconds']:.2f} s){extra}", file=sys.stdout)
            if done % int(cfg.checkpoint_every) == 0 or done == steps:
                checkpoint(done)
    board.close()
    if start_step >= steps and not ckpt_path.is_file():
        checkpoint(start_step)
    seconds = time.perf_counter() - started
    checksum = float(sum(p.detach().double().sum() for p in core.parameters()))
    distributed.cleanup(dctx)
    return {"out_dir": str(out_dir), "checkpoint": str(ckpt_path), "data_root": str(root),
            "steps": steps, "start_step": start_step, "last": last, "seconds": round(seconds, 1),
            "pcg_failures": {"not_converged": failures[0], "solves": failures[1]}, "skipped": skipped,
            "rank": dctx.rank, "world_size": dctx.world, "parameter_checksum": checksum}


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    summary = train(cfg)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
