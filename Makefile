# The two commands of the README: `make demo` and `make test`. Each creates .venv when it is missing
# and installs the project with its dev extras (again whenever pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: demo test lint notebooks bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gmix table1 --preset tiny --out runs/table1-tiny

lint: $(STAMP)
	$(PY) -m ruff check gmix_curvature tests bench theory

test: $(STAMP) lint
	$(PY) -m pytest -q

notebooks: $(STAMP)
	$(PY) notebooks/run.py --out build/notebooks

# the CPU benchmarks; on a GPU machine: bash bench/device_check.sh
bench: $(STAMP)
	for f in bench/mixing_overhead.py bench/accumulation.py bench/ddp_hook.py bench/curvature.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf build runs .pytest_cache .ruff_cache
