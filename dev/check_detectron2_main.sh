#!/usr/bin/env bash
# Dev only: the test suite on Detectron2's main branch from the archive in ../shared/vendor (the
# machines here cannot reach GitHub; this archive stands in for it), in the default venv.
#   bash dev/check_detectron2_main.sh [PYTHON] [-- pytest args]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
archive=("$root"/../shared/vendor/detectron2-*.tar.gz)
[ -f "${archive[0]}" ] || { echo "no Detectron2 archive in $root/../shared/vendor" >&2; exit 1; }
python="${1:-python3}"
[ "$#" -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
DETECTRON2_SOURCE="$(realpath "${archive[0]}")" bash "$root/scripts/setup.sh" "$python"
cd "$root"
.venv/bin/python -c "import detectron2; print('Detectron2', detectron2.__version__, 'from', detectron2.__file__)"
cat .venv/detectron2-source.txt
.venv/bin/python -m pytest -p no:cacheprovider "$@"
