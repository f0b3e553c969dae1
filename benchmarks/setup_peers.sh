#!/usr/bin/env bash
# Builds benchmarks/.venv-peers: the peers that benchmarks/peers.py compares difftto with.
# They are benchmark-only dependencies, kept out of the project's .venv.
#
#   bash benchmarks/setup_peers.sh            # torchopt, theseus-ai, jaxopt + jax[cpu], difftto
#   WITH_JAX=0 bash benchmarks/setup_peers.sh # without jaxopt/jax (~620 MB; installed in about
#                                             # a minute here, jax 0.10.2)
#
# theseus-ai 0.2.3 is an sdist whose setup imports torch, and it needs scikit-sparse,
# which builds against the SuiteSparse headers (apt-get install libsuitesparse-dev).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=benchmarks/.venv-peers
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install --upgrade pip wheel "setuptools>=77"
$PIP install "torch==2.13.0"     # the CPU build, as the project's scripts/install.sh
$PIP install "torchopt==0.7.3"   # keeps torch 2.13.0; its C++ extension may not load (the
                                 # pure-Python implicit differentiation is all we use)
$PIP install --no-build-isolation "scikit-sparse<0.5"
$PIP install --no-build-isolation "theseus-ai==0.2.3"
$PIP install --no-build-isolation --no-deps -e .
if [ "${WITH_JAX:-1}" = "1" ]; then
  timeout 600 $PIP install "jaxopt==0.8.5" "jax[cpu]" \
    || echo "jaxopt install failed or timed out: peers.py will record it as skipped"
fi
"$VENV/bin/python" - <<'PY'
import torch, torchopt, theseus
print("torch", torch.__version__, "torchopt", torchopt.__version__, "theseus", theseus.__version__)
try:
    import jax, jaxopt
    print("jax", jax.__version__, "jaxopt", jaxopt.__version__)
except ImportError:
    print("jaxopt: not installed")
PY
