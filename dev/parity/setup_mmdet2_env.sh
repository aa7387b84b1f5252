#!/usr/bin/env bash
# Dev only: MMDetection 2.x (the reference of htc's test-time augmentation, whose 3.x HTC has no
# aug_test) in its own venv (.venv-mmdet2), never a runtime dependency of htc. mmcv 1.x is built
# without compiled ops (MMCV_WITH_OPS=0); the few HTC needs come from dev/parity/mmcv_ext.py,
# installed as mmcv/_ext.py, as for the 3.x reference.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="$root/.venv-mmdet2"
constraints="$root/dev/parity/constraints-mmdet2.txt"
[ -x "$venv/bin/python" ] || python3.11 -m venv "$venv"
"$venv/bin/python" -m pip install -q -c "$constraints" pip
"$venv/bin/python" -m pip install -q -c "$constraints" torch torchvision numpy
# mmcv 1.x is a source package whose setup.py imports pkg_resources, gone from the setuptools
# that torch needs: its wheel is built in a venv of its own
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
python3.11 -m venv "$build/venv"
"$build/venv/bin/python" -m pip install -q "setuptools==69.5.1" "wheel==0.45.1"
MMCV_WITH_OPS=0 "$build/venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation \
  -c "$constraints" -w "$build/wheels" mmcv
"$venv/bin/python" -m pip install -q -c "$constraints" "$build"/wheels/mmcv-*.whl mmdet
site="$("$venv/bin/python" -c 'import mmcv, os; print(os.path.dirname(mmcv.__file__))')"
cp "$root/dev/parity/mmcv_ext.py" "$site/_ext.py"
"$venv/bin/python" -c "import mmdet, mmcv; from mmcv.ops import RoIAlign, nms; print('mmdet', mmdet.__version__, 'mmcv', mmcv.__version__)"
