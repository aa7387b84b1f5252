#!/usr/bin/env bash
# One entry point that makes the venv: torch, Detectron2 (an existing compiled one, else the newest
# sources or v0.6, with our pure-Python _C), the project (editable) and its test tools.
# Idempotent; needs only the package registries (and GitHub, where reachable).
#   bash scripts/setup.sh [PYTHON]          PYTHON: the interpreter to build on (default: the
#                                           venv's own where it works, else python3)
# Environment:
#   DETECTRON2=main|0.6   main (default): Detectron2's newest sources, Python 3.10-3.13, venv .venv
#                         0.6: Detectron2 v0.6 of 2021-11, Python 3.10-3.11, venv .venv-detectron2-0.6
#   DETECTRON2_SOURCE=X   where main comes from: a git URL, a source archive or folder, or a wheel
#                         (default: GitHub's main branch, else the newest Detectron2 on PyPI)
#   VENV=DIR              the venv to make (default: by DETECTRON2, as above)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${1:-${PYTHON:-}}"
detectron2="${DETECTRON2:-main}"
source="${DETECTRON2_SOURCE:-}"
case "$source" in "~" | "~/"*) source="${HOME:?}${source:1}" ;; esac
if [ -e "$source" ]; then source="$(realpath "$source")"; fi  # a path given from the caller's folder
is_git_url() { [[ "$1" =~ ^(git\+)?(https?|ssh|git|file):// || "$1" == *.git ]]; }
if [ -n "$source" ] && [ ! -e "$source" ] && ! is_git_url "$source"; then
  echo "[setup] DETECTRON2_SOURCE=$source: no such file or folder, and not a git URL" >&2
  exit 2
fi
venv="${VENV:+$(realpath -m "$VENV")}"
cd "$root"
case "$detectron2" in
  main) constraints="$root/constraints.txt"; supported="3.10 3.11 3.12 3.13"; default_venv=.venv ;;
  0.6) constraints="$root/constraints-detectron2-0.6.txt"; supported="3.10 3.11"
       default_venv=.venv-detectron2-0.6 ;;
  *) echo "[setup] DETECTRON2=$detectron2: use main (the default) or 0.6" >&2; exit 2 ;;
esac
if [ "$detectron2" = 0.6 ] && [ -n "$source" ]; then
  echo "[setup] DETECTRON2_SOURCE gives Detectron2's newest sources; unset it for DETECTRON2=0.6" >&2
  exit 2
fi
[ -n "${VENV:-}" ] || venv="$root/$default_venv"
start=$SECONDS
version_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }

made="$venv/.htc-setup-made"  # this setup made the venv (a later one may remake it)
record="$venv/detectron2-source.txt"
if [ "$detectron2" = main ] && [ -z "$source" ] && [ -f "$record" ]; then
  recorded="$(sed -n '1s/^main from //p' "$record")"  # the source of an earlier run, kept
  if [ -n "$recorded" ] && [ ! -e "$recorded" ] && ! is_git_url "$recorded"; then
    gone="$recorded"  # removed since: the copy installed from it is kept, as its sha256 says
    echo "[setup] Detectron2 from $gone, which is gone since: the installed copy is kept" \
      "(DETECTRON2_SOURCE replaces it)"
  elif [ -n "$recorded" ]; then
    echo "[setup] Detectron2 from $recorded, as before (DETECTRON2_SOURCE replaces it)"
  fi
  source="${recorded:-}"
fi
made_here() {  # this setup made the venv: it says so, or (made before it said so) it is the
  # default venv with this setup's stamp; a stamp alone is also in a VENV of the user's
  [ -f "$made" ] || { [ "$venv" = "$root/$default_venv" ] && [ -f "$venv/.htc-setup-stamp" ]; }
}
remake() {  # the venv removed, to be made anew: only one that this setup made
  if ! made_here; then
    echo "[setup] $venv $1, and this setup did not make it, so it is left alone: give" \
      "another VENV, or remove it" >&2
    exit 2
  fi
  if [ -n "${gone:-}" ]; then
    echo "[setup] $venv $1, and its Detectron2 came from $gone, which is gone: give" \
      "DETECTRON2_SOURCE" >&2
    exit 2
  fi
  echo "[setup] $venv $1; making it anew"
  mv "$venv" "$venv.removing.$$"  # an interrupted removal leaves no venv without its marks
  rm -rf "$venv.removing.$$"
}
if [ -e "$venv" ] && ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  if [ -n "$(ls -A "$venv")" ]; then remake "does not run pip (an interrupted setup?)"; fi
fi
venv_version="$(version_of "$venv/bin/python" 2>/dev/null || true)"
[ -n "$python" ] || python="${venv_version:+$venv/bin/python}"  # a later run keeps its Python
python="${python:-python3}"

if ! version="$(version_of "$python" 2>/dev/null)"; then
  why="$("$python" -c '' 2>&1 | grep . | head -n 4 || true)"
  echo "[setup] cannot run the interpreter '$python'${why:+: $why}" >&2
  echo "[setup] name one that runs: make demo PYTHON=/path/to/python3.X" >&2
  exit 2
fi
if [[ " $supported " != *" $version "* ]]; then
  echo "[setup] $python is Python $version; DETECTRON2=$detectron2 runs on Python $supported" >&2
  exit 2
fi

if [ -n "$venv_version" ] && [ "$venv_version" != "$version" ]; then
  remake "is Python $venv_version, Python $version is asked"
fi
compiled=""  # a compiled Detectron2 in the base interpreter (a user's own CUDA build), used as it is
if [ -x "$venv/bin/python" ]; then
  if "$venv/bin/python" "$root/scripts/install_detectron2.py" --check >/dev/null 2>&1; then compiled=1; fi
elif "$python" "$root/scripts/install_detectron2.py" --check >/dev/null 2>&1; then
  if "$python" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
    echo "[setup] $python is a venv's, with a compiled Detectron2 that a new venv would not see:" \
      "install the project into that venv (pip install -e .), or name its base interpreter" >&2
    exit 2
  fi
  echo "[setup] found a compiled Detectron2 in $python: the venv will see it (--system-site-packages)"
  mkdir -p "$venv" && touch "$made"  # first: an interrupted venv is this setup's to remake
  "$python" -m venv --system-site-packages "$venv"
  compiled=1
else
  mkdir -p "$venv" && touch "$made"
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
content=""  # an archive or wheel changes under its path: its bytes are part of the stamp
if [ -f "$source" ]; then content="$(sha256sum "$source" | cut -d' ' -f1)"; fi
if [ -n "${gone:-}" ]; then content="$(sed -n 3p "$record")"; fi  # as when it was installed
stamp="$venv/.htc-setup-stamp"
want="$( (echo "$version $detectron2 $source $content"
          cat "$constraints" setup.cfg pyproject.toml scripts/setup.sh scripts/install_detectron2.py \
              scripts/detectron2_C.py) | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c "import htc, detectron2.engine" 2>/dev/null; then
  echo "[setup] $venv is up to date ($((SECONDS - start)) s)"
  exit 0
fi

pip_c=(-c "$constraints")
if [ -n "$compiled" ]; then  # its torch is the one its _C was built against: neither it nor
  # what it pins (Triton, CUDA's libraries) is pinned over
  grep -Ev '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==' "$constraints" \
    > "$venv/constraints-without-torch.txt"
  pip_c=(-c "$venv/constraints-without-torch.txt")
fi
"$py" -m pip install -q "${pip_c[@]}" pip
if [ -z "$compiled" ]; then  # pinned, also over a torch of an earlier pin
  "$py" -m pip install -q "${pip_c[@]}" torch torchvision
fi
"$py" -m pip install -q "${pip_c[@]}" numpy Pillow setuptools opencv-python-headless pycocotools \
  matplotlib fvcore iopath black omegaconf hydra-core tqdm tensorboard pytest pytest-xdist ruff onnx onnxruntime \
  submitit faster-coco-eval
if [ "$detectron2" = main ]; then  # Detectron2's ViT, Swin and MViT import timm (v0.6 has none),
  # fairscale for activation checkpointing (the MViTv2-H configs)
  "$py" -m pip install -q "${pip_c[@]}" timm fairscale
fi
# shapely: Detectron2's Cityscapes loader (polygons) and its crop of polygon masks (LSJ);
# pyquaternion: what cityscapesscripts' evaluation imports beyond numpy and Pillow.
"$py" -m pip install -q "${pip_c[@]}" shapely pyquaternion
# Cityscapes' and LVIS's official evaluation, as Detectron2 calls them, without the dependencies
# their metadata declares: cityscapesscripts' are the typing backport, requests and GUI tools
# (not what its evaluation imports), lvis's opencv-python would clash with opencv-python-headless.
"$py" -m pip install -q "${pip_c[@]}" --no-deps cityscapesscripts lvis
# The COCO panoptic API for COCOPanopticEvaluator; its metadata's numpy<2 and scikit-image are not
# what its code imports (numpy, Pillow), so it comes without them and pip check overlooks it.
"$py" -m pip install -q "${pip_c[@]}" --no-deps panopticapi-lite
"$py" "$root/scripts/install_detectron2.py" --constraints "$constraints" --version "$detectron2" \
  ${source:+--source "$source"}
"$py" -m pip install -q "${pip_c[@]}" --no-build-isolation --no-deps -e "$root"
if ! problems="$("$py" -m pip check)"; then
  problems="$(grep -iv '^\(panopticapi-lite\|cityscapesscripts\|lvis\) ' <<<"$problems" || true)"
  if [ -n "$problems" ]; then echo "$problems" >&2; exit 1; fi
fi
echo "$want" > "$stamp"
echo "[setup] $venv ready in $((SECONDS - start)) s: $(du -sh "$venv" | cut -f1), Python $version," \
  "Detectron2 $(sed -n 2p "$venv/detectron2-source.txt" 2>/dev/null || echo "(compiled, from $python)")"
