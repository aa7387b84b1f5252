# The two entry points of README.md. Both set up .venv first (idempotent, fast when done).
PY := .venv/bin/python

.PHONY: setup demo test

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) scripts/main_job.py

test: setup
	$(PY) -m pytest -p no:cacheprovider
