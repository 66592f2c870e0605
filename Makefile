# Quickstart targets. Each sets up .venv on first use (scripts/setup.sh) and is quick afterwards.
PY := .venv/bin/python

.PHONY: setup run test

setup:
	@bash scripts/setup.sh

run: setup
	$(PY) -m fctrain.run $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)
