# Two entry points, each doing its own set-up in a local virtual environment:
#   make demo   runs the main job: the Diff3R example end to end
#   make test   runs the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.difftto-installed

# Compile the CPU kernels once (cached per machine) before tests or the demo start
# processes that would otherwise each wait on the compile.
KERNELS := $(PY) -c "from difftto.problems.splatting.cpu_kernels import cpu_kernels_available as a; ok, why = a(); print('difftto CPU kernels:', 'ready' if ok else why)"

.PHONY: demo quickstart test lint bench clean-venv

$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install.sh
	touch $(STAMP)

demo: $(STAMP)
	$(KERNELS)
	$(PY) examples/diff3r/demo.py

quickstart: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(PY) -m ruff check .
	$(KERNELS)
	# Two pytest workers with one torch thread each: no oversubscription of 2 cores.
	OMP_NUM_THREADS=1 HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(PY) -m pytest -n 2 -q

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) benchmarks/pcg.py

clean-venv:
	rm -rf $(VENV)
