#!/usr/bin/env bash
# Dev only: run the test suite against a newer Detectron2 than v0.6, the Python sources of
# Detectron2's main branch as of 2024-11 (version 0.7.2, ShapeSpec dataclass,
# Backbone.padding_constraints, comm.create_local_process_group), taken from the
# sal-detectron2 0.7.2 wheel on PyPI (a redistribution of Detectron2; its compiled _C is for
# Python 3.10, so our pure-Python _C replaces it). Uses the project's .venv otherwise.
#   bash dev/check_detectron2_main.sh [pytest args]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
url="https://files.pythonhosted.org/packages/68/b4/805c6fcf02a2bc032255955745954305f8dfdb56c8b7cbb5470b7e30e2f0/sal_detectron2-0.7.2-cp310-none-any.whl"
sha="491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
work="$root/.cache/detectron2-main"
if [ ! -f "$work/detectron2/__init__.py" ]; then
  mkdir -p "$work"
  curl -sSfL -o "$work/wheel.zip" "$url"
  echo "$sha  $work/wheel.zip" | sha256sum -c -
  (cd "$work" && python3 -m zipfile -e wheel.zip unpacked && mv unpacked/detectron2 . && rm -rf unpacked)
  rm -f "$work"/detectron2/_C.*.so
fi
cp "$root/scripts/detectron2_C.py" "$work/detectron2/_C.py"
cd "$root"
PYTHONPATH="$work" .venv/bin/python -c "import detectron2; print('Detectron2', detectron2.__version__, 'from', detectron2.__file__)"
PYTHONPATH="$work" .venv/bin/python -m pytest -p no:cacheprovider "$@"
