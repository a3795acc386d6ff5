# Two commands for a fresh machine (see README.md):
#   make run    set up .venv and run the SILMM loop on the built-in shapes world
#   make test   set up .venv and run the test suite (what CI runs)
PY := .venv/bin/python

.PHONY: setup run test lint bench
setup:
	@bash scripts/setup.sh

run: setup
	$(PY) -m silmm_fast.train

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: setup
	$(PY) -m silmm_fast.bench --device cpu
