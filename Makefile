# The README's two commands: `make demo` and `make test`. Both create .venv if
# it is missing. torch is installed first and pinned (2.13.0, CPU build) so no
# resolver ever pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test chaos venv bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) examples/llama/demo.py

# CI's suite: everything but the chaos matrix, whose fast `ci` subset it keeps
# (the full matrix is `make chaos`).
test: venv
	$(PY) -m pytest -q -m "not chaos or ci" $(PYTEST_ARGS)

# The chaos fault matrix: real faults in real hpresil-run jobs (a few minutes;
# `-m ci` is the fast subset). Mounting the tiny filesystems of two cases needs root.
chaos: venv
	$(PY) -m pytest -q -m chaos $(PYTEST_ARGS)

# Every benchmark prints ratios against a baseline measured in the same run (docs/benchmarks.md).
bench: venv
	$(PY) bench/launcher_overhead.py
	$(PY) bench/checkpoint.py
	$(PY) bench/seal.py
	$(PY) bench/rollback.py
	$(PY) bench/back_to_back.py
	$(PY) bench/s3_drain.py
	$(PY) bench/replication.py
	$(PY) bench/control_plane.py --agents 3,16,64
	$(PY) bench/hang.py
	$(PY) bench/rescale.py
	$(PY) bench/goodput.py
	$(PY) bench/health_overhead.py
	$(PY) bench/mesh_layout.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
