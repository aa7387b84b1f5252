"""Install Detectron2 into the running interpreter, or leave an existing compiled one alone.

* A Detectron2 whose ``_C`` is a compiled extension (a user's own source build, e.g. for CUDA)
  is used as it is: nothing is installed over it.
* Otherwise Detectron2 v0.6 is installed from the ``pb1-detectron2==0.6`` sdist (the official
  v0.6 Python sources without ``layers/csrc``), with no extension built, its model-zoo configs
  kept, and ``scripts/detectron2_C.py`` installed as ``detectron2/_C.py``.

Usage: python scripts/install_detectron2.py [--check] [--constraints FILE]
``--check`` exits 0 if a compiled Detectron2 is importable, 1 otherwise, and installs nothing.
"""

import argparse
import hashlib
import importlib.machinery
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Optional

SDIST = "pb1-detectron2-0.6.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
INDEX = "https://pypi.org/simple/pb1-detectron2/"
STAND_IN = Path(__file__).resolve().parent / "detectron2_C.py"


def find_detectron2_dir() -> Optional[Path]:
    """The importable ``detectron2`` package directory, found without importing it."""
    spec = importlib.machinery.PathFinder.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def compiled_extension(pkg: Path) -> Optional[Path]:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = pkg / f"_C{suffix}"
        if candidate.is_file():
            return candidate
    return None


def stand_in_is_current(pkg: Path) -> bool:
    installed = pkg / "_C.py"
    return installed.is_file() and installed.read_bytes() == STAND_IN.read_bytes()


def fetch_sdist(dest: Path) -> Path:
    """Download the sdist from PyPI's simple index (JSON API) and verify its sha256.

    ``pip download`` cannot be used: newer pip refuses the sdist's metadata (a direct-URL extra).
    """
    accept = {"Accept": "application/vnd.pypi.simple.v1+json"}
    request = urllib.request.Request(INDEX, headers=accept)
    with urllib.request.urlopen(request, timeout=120) as response:
        files = json.load(response)["files"]
    entry = next((f for f in files if f["filename"] == SDIST), None)
    if entry is None:
        raise SystemExit(f"{SDIST} is not listed at {INDEX}")
    path = dest / SDIST
    with urllib.request.urlopen(entry["url"], timeout=600) as response:
        path.write_bytes(response.read())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(f"{SDIST}: sha256 {digest} differs from the pinned {SDIST_SHA256}")
    return path


def prepare_tree(sdist: Path, work: Path) -> Path:
    """Unpack and adapt the sdist: no extension, configs kept, our _C, no top-level ``tools``."""
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    tree = work / "pb1-detectron2-0.6"
    setup_py = tree / "setup.py"
    text = setup_py.read_text()
    for old, new in [
        ("ext_modules=get_extensions(),", "ext_modules=[],"),
        ('"panopticapi @ https://github.com/cocodataset/panopticapi/archive/master.zip",', ""),
    ]:
        if old not in text:
            raise SystemExit(f"unexpected {setup_py}: cannot find {old!r}")
        text = text.replace(old, new)
    setup_py.write_text(text)
    zoo = tree / "detectron2" / "model_zoo" / "configs"
    if zoo.is_dir() and not (tree / "configs").exists():
        shutil.move(str(zoo), str(tree / "configs"))
    shutil.copyfile(STAND_IN, tree / "detectron2" / "_C.py")
    (tree / "tools" / "__init__.py").unlink(missing_ok=True)
    return tree


def install(constraints: Optional[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="htc-d2-") as tmp:
        tree = prepare_tree(fetch_sdist(Path(tmp)), Path(tmp))
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation"]
        if constraints:
            cmd += ["-c", constraints]
        subprocess.run(cmd + [str(tree)], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report a compiled Detectron2")
    parser.add_argument("--constraints", help="pip constraints file")
    args = parser.parse_args()

    pkg = find_detectron2_dir()
    compiled = compiled_extension(pkg) if pkg else None
    if args.check:
        print(f"compiled Detectron2: {compiled}" if compiled else "no compiled Detectron2")
        return 0 if compiled else 1
    if compiled:
        print(f"[detectron2] using the compiled Detectron2 at {compiled}; installing nothing")
        return 0
    if pkg and stand_in_is_current(pkg):
        print(f"[detectron2] v0.6 with the pure-Python _C already installed at {pkg}")
        return 0
    print("[detectron2] installing v0.6 from the pb1-detectron2 sdist with the pure-Python _C")
    install(args.constraints)
    return 0


if __name__ == "__main__":
    sys.exit(main())
