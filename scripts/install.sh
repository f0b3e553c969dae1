#!/usr/bin/env bash
# Creates the local virtual environment and installs difftto with its test tools.
# Traps handled here (see README "Installation"):
#  - torch is installed first, pinned to 2.13.0 (a CPU build); the package's range keeps it.
#  - theseus-ai 0.2.3 is an sdist whose setup imports torch: --no-build-isolation.
#  - theseus-ai requires scikit-sparse, which builds against SuiteSparse headers.
#    As root with apt we install libsuitesparse-dev; otherwise theseus-ai is installed
#    without scikit-sparse (its dense solvers, all difftto uses, work without it).
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" --upgrade pip "setuptools>=77" wheel
echo "[install] $TORCH_SPEC"
"${PIP[@]}" "$TORCH_SPEC"

have_suitesparse() { [ -f /usr/include/suitesparse/cholmod.h ]; }
if ! have_suitesparse && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[install] apt-get install libsuitesparse-dev (for theseus-ai's scikit-sparse)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libsuitesparse-dev) \
    >/dev/null || echo "[install] apt-get failed; continuing without SuiteSparse"
fi
if have_suitesparse; then
  "${PIP[@]}" "scikit-sparse<0.5"
  "${PIP[@]}" --no-build-isolation "theseus-ai==0.2.3"
else
  echo "[install] no SuiteSparse headers: installing theseus-ai without scikit-sparse"
  "${PIP[@]}" numpy scipy torchlie torchkin
  "${PIP[@]}" --no-build-isolation --no-deps "theseus-ai==0.2.3"
fi
echo "[install] difftto[dev] (editable)"
if have_suitesparse; then
  "${PIP[@]}" --no-build-isolation -e ".[dev]"
else
  # theseus-ai is already in place; --no-deps keeps pip from asking for scikit-sparse again.
  "${PIP[@]}" --no-build-isolation -e ".[dev]" --no-deps
  "${PIP[@]}" "numpy>=1.24" "hydra-core>=1.3" "gsplat==1.5.3" "tqdm>=4.60" \
    pytest pytest-xdist hypothesis ruff scikit-image pillow
fi
"$VENV/bin/python" -c "import torch, difftto; print('[install] ok: torch', torch.__version__)"
