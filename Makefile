# Two commands on a fresh machine with only python3: `make demo` and `make test`.
# Both create .venv when it is missing and install the project (editable) with the exact versions
# in constraints.txt (what CI tested; a cluster image installs the same set).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.splatclip-installed
PYTEST_ARGS ?=
# TEST_WORKERS: pytest-xdist workers, a test module to a worker (its module fixtures built once);
# 0 runs the suite in one process. README, "make test", holds the timings.
TEST_WORKERS ?= 2

.PHONY: setup demo test test-unit bench gpu-check constraints clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	-$(BIN)/python -m splatclip.cuda.aot  # the CPU renderer's kernels, compiled once (where it fails: eager)
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/render_speed.py
	$(BIN)/python benchmarks/fit_quality.py
	$(BIN)/python benchmarks/fit_scale.py --quick
	$(BIN)/python benchmarks/kernels.py

# On a machine with a CUDA GPU: the gpu-marked tests, then the kernels' resources, work and timings.
gpu-check: $(STAMP)
	@$(BIN)/python -c "import sys, torch; sys.exit(None if torch.cuda.is_available() else 'gpu-check needs a CUDA device: torch sees none')"
	$(BIN)/python -m pytest -m gpu -v -rs $(PYTEST_ARGS)
	$(BIN)/python benchmarks/kernels.py

# Re-pin constraints.txt to what is installed in .venv now.
constraints: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^splatclip' > constraints.txt

clean:
	rm -rf $(VENV) outputs data mlflow.db mlruns mlartifacts .pytest_cache
