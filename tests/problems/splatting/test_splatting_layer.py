"""The 3DGS problem through ImplicitLayer: implicit = unrolled at convergence, and
test-time optimization recovers perturbed Gaussians."""

import torch

import difftto
from difftto.objective import InnerObjective
from difftto.problems.splatting import rasterize
from difftto.problems.splatting.synthetic import pixel_aligned_scene, random_scene
from difftto.regularizers import Proximal
from difftto.solvers import PCG

GROUPS = ("means", "log_scales", "quats", "opacities", "colors")


def tiny_case(seed=0, size=6):
    """2 context views of a pixel-aligned scene (float64) and a third, target view."""
    truth, viewmats, ks = pixel_aligned_scene(1, 2, size, size, render_views=3, seed=seed, dtype=torch.float64)
    ctx = (viewmats[:, [0, 2]], ks[:, [0, 2]])
    tgt = (viewmats[:, [1]], ks[:, [1]])
    images = rasterize(truth, *ctx, size, size).colors
    target = rasterize(truth, *tgt, size, size).colors
    g = torch.Generator().manual_seed(seed + 1)
    theta0 = {k: v + 0.02 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in truth.items()}
    data = {"viewmats": ctx[0], "Ks": ctx[1], "images": images}
    return theta0, data, tgt, target, size


def test_implicit_gradient_agrees_with_unrolled_at_convergence(largest_eigenvalue):
    theta0, data, tgt, target, size = tiny_case()
    problem = difftto.problems.get("gaussian_splatting")
    lam = {k: torch.full(v.shape[:2], 3.0, dtype=torch.float64) for k, v in theta0.items()}
    layout = difftto.Layout.of(theta0)
    flat0 = layout.flatten(theta0)
    objective = InnerObjective(problem, layout, data, Proximal(flat0, layout.expand(lam)))
    lr = 1.0 / largest_eigenvalue(objective, flat0)

    grads = {}
    for mode, inner in (("implicit", difftto.GradientDescent(lr=lr, steps=600)),
                        ("unrolled", difftto.GradientDescent(lr=lr, steps=600))):
        t0 = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
        layer = difftto.ImplicitLayer(problem, inner=inner, backward=mode, hessian="exact",
                                      solver=PCG(rtol=1e-10, max_iter=2000))
        star, info = layer(t0, lam, data)
        assert float(info.forward.stationarity.max()) < 1e-4, info
        render = rasterize(star, *tgt, size, size).colors
        (render - target).pow(2).mean().backward()
        grads[mode] = torch.cat([t0[k].grad.reshape(-1) for k in GROUPS])
    cosine = torch.nn.functional.cosine_similarity(grads["implicit"], grads["unrolled"], dim=0)
    assert cosine >= 0.99, float(cosine)


def test_gauss_newton_tto_recovers_perturbed_gaussians_to_40_db():
    """The library's own GaussNewton inner optimizer, through the layer, refits a scene
    made of known Gaussians from perturbed ones (context views, float64)."""
    truth, viewmats, ks = random_scene(1, 12, 2, 12, 12, seed=11, scale_px=2.5)
    images = rasterize(truth, viewmats, ks, 12, 12).colors
    g = torch.Generator().manual_seed(0)
    theta0 = {k: v + s * torch.randn(v.shape, generator=g, dtype=v.dtype)
              for (k, v), s in zip(truth.items(), (0.005, 0.05, 0.05, 0.2, 0.05))}
    inner = difftto.GaussNewton(steps=25, damping=1e-2, damping_factor=3.0,
                                solver=PCG(rtol=1e-6, max_iter=200, on_failure="best"))
    layer = difftto.ImplicitLayer("gaussian_splatting", inner=inner)
    star, info = layer(theta0, 1e-6, {"viewmats": viewmats, "Ks": ks, "images": images})

    def psnr(theta):
        return float(-10 * torch.log10((rasterize(theta, viewmats, ks, 12, 12).colors - images).pow(2).mean()))

    before, after = psnr(theta0), psnr(star)
    assert before < 35 and after >= 40, (before, after, info)
