#!/usr/bin/env bash
# One entry point that makes .venv: torch, Detectron2 (existing compiled one, or v0.6 with our
# pure-Python _C), the project (editable) and its test tools. Idempotent; needs only the package
# registries. Usage: bash scripts/setup.sh [PYTHON]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${1:-${PYTHON:-python3}}"
venv="$root/.venv"
pip_c=(-c "$root/constraints.txt")
start=$SECONDS

if [ ! -x "$venv/bin/python" ]; then
  # A compiled Detectron2 in the base interpreter (a user's own CUDA build) is used as it is.
  if "$python" "$root/scripts/install_detectron2.py" --check >/dev/null 2>&1; then
    echo "[setup] found a compiled Detectron2 in $python: the venv will see it (--system-site-packages)"
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi
py="$venv/bin/python"
stamp="$venv/.htc-setup-stamp"
want="$(cat constraints.txt setup.cfg pyproject.toml scripts/setup.sh scripts/install_detectron2.py scripts/detectron2_C.py | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c "import htc, detectron2.engine" 2>/dev/null; then
  echo "[setup] .venv is up to date ($((SECONDS - start)) s)"
  exit 0
fi

"$py" -m pip install -q "${pip_c[@]}" pip
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "${pip_c[@]}" torch torchvision
fi
"$py" -m pip install -q "${pip_c[@]}" numpy Pillow setuptools opencv-python-headless pycocotools \
  matplotlib fvcore iopath black omegaconf hydra-core tqdm tensorboard pytest ruff
"$py" "$root/scripts/install_detectron2.py" --constraints "$root/constraints.txt"
"$py" -m pip install -q "${pip_c[@]}" --no-build-isolation --no-deps -e "$root"
"$py" -m pip check
echo "$want" > "$stamp"
echo "[setup] .venv ready in $((SECONDS - start)) s: $(du -sh "$venv" | cut -f1)"
