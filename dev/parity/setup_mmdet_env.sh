#!/usr/bin/env bash
# Dev only: the MMDetection reference environment used to make the parity fixtures, in its own
# venv (.venv-mmdet), never a runtime dependency of htc. mmcv-lite has no compiled ops; the few
# HTC needs come from dev/parity/mmcv_ext.py, installed as mmcv/_ext.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="$root/.venv-mmdet"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q -c "$root/dev/parity/constraints-mmdet.txt" pip
"$venv/bin/python" -m pip install -q -c "$root/dev/parity/constraints-mmdet.txt" \
  torch torchvision mmengine mmcv-lite mmdet
site="$("$venv/bin/python" -c 'import mmcv, os; print(os.path.dirname(mmcv.__file__))')"
cp "$root/dev/parity/mmcv_ext.py" "$site/_ext.py"
"$venv/bin/python" -c "import mmdet, mmcv, mmengine; from mmcv.ops import RoIAlign, nms; print('mmdet', mmdet.__version__, 'mmcv', mmcv.__version__)"
