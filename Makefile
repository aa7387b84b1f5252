# The two entry points of README.md. Both set up the venv first (idempotent, fast when done).
#   PYTHON=python3.12     the interpreter to build the venv on (Python 3.10-3.13; default: the
#                         venv's own where it works, else python3)
#   DETECTRON2=0.6        Detectron2 v0.6 instead of the newest (its own venv, Python 3.10-3.11)
#   DETECTRON2_SOURCE=X   where the newest Detectron2 comes from (git URL, archive, folder, wheel)
#   TEST_PROCESSES=0      the tests in pytest's own process (default: 2 worker processes)
PYTHON ?=
DETECTRON2 ?= main
TEST_PROCESSES ?= 2
VENV ?= $(if $(filter 0.6,$(DETECTRON2)),.venv-detectron2-0.6,.venv)
PY := $(VENV)/bin/python
export DETECTRON2 DETECTRON2_SOURCE VENV

.PHONY: setup demo test

setup:
	bash scripts/setup.sh $(if $(PYTHON),"$(PYTHON)")

demo: setup
	"$(PY)" scripts/main_job.py

# --dist worksteal: a process that runs out of tests takes the other's queued ones (the
# default hands out fixed batches; the suite's long tests left one process idle at the end).
test: setup
	"$(PY)" -m pytest -p no:cacheprovider -n $(TEST_PROCESSES) --dist worksteal
