"""Install Detectron2 into the running interpreter, or leave an existing compiled one alone.

* A Detectron2 whose ``_C`` is a compiled extension (a user's own source build, e.g. for CUDA)
  is used as it is: nothing is installed over it.
* ``--version main`` (the default): Detectron2's newest sources. From ``--source`` when given (a
  git URL, a source archive, a source folder or a wheel), else from GitHub's main branch, else,
  where GitHub cannot be reached, from the newest Detectron2 sources on PyPI (``sal-detectron2``
  0.7.2, Detectron2's main branch of 2024-11 redistributed as a Python 3.10 wheel).
* ``--version 0.6``: Detectron2 v0.6 from the ``pb1-detectron2==0.6`` sdist (the official v0.6
  Python sources without ``layers/csrc``).

Whatever the source, no C++ extension is compiled: ``scripts/detectron2_C.py`` is installed as
``detectron2/_C.py``. Where it came from is written to ``<prefix>/detectron2-source.txt``.

Usage: python scripts/install_detectron2.py [--check] [--version {main,0.6}] [--source LOCATION]
                                            [--constraints FILE]
``--check`` exits 0 if a compiled Detectron2 is importable, 1 otherwise, and installs nothing.
"""

import argparse
import hashlib
import html
import importlib.machinery
import importlib.util
import json
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import urljoin, urlsplit

STAND_IN = Path(__file__).resolve().parent / "detectron2_C.py"
GITHUB = "https://github.com/facebookresearch/detectron2.git"
GIT_TIMEOUT_S = 300
RECORD = Path(sys.prefix) / "detectron2-source.txt"


PYPI_SIMPLE = "https://pypi.org/simple"


@dataclass(frozen=True)
class PyPIFile:
    """One pinned file of a PyPI project, found on the simple indexes pip is configured with,
    then PyPI's (``pip download`` cannot fetch either: pb1's metadata has a direct-URL extra that
    newer pip refuses, and sal's wheel is tagged for CPython 3.10 only). Its sha256 is checked
    whichever index serves it."""

    project: str
    filename: str
    sha256: str

    def fetch(self, dest: Path) -> Path:
        config = pip_config()
        opener, indexes, failures = url_opener(config), simple_indexes(config), []
        for index in indexes:
            try:
                url = self._link(opener, index)
            except (OSError, ValueError) as e:  # unreachable, or not an index page
                failures.append(f"{index}: {e}")
                continue
            if url is not None:
                return self._download(opener, url, dest / self.filename)
            failures.append(f"{index}: not listed")
        raise SystemExit(f"{self.filename} cannot be fetched: " + "; ".join(failures))

    def _link(self, opener: urllib.request.OpenerDirector, index: str) -> Optional[str]:
        """The URL of this file on the simple index ``index`` (PEP 691 JSON or PEP 503 HTML),
        or None where the project does not list it."""
        page = f"{index.rstrip('/')}/{self.project}/"
        if page.startswith("file:"):
            page += "index.html"
        accept = {"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"}
        try:
            with opener.open(urllib.request.Request(page, headers=accept), timeout=120) as r:
                kind, body = r.headers.get("Content-Type", ""), r.read().decode()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise
        except urllib.error.URLError as e:  # a file: index without the project
            if isinstance(e.reason, FileNotFoundError):
                return None
            raise
        if "json" in kind:
            links = [(f["filename"], f["url"]) for f in json.loads(body)["files"]]
        else:
            hrefs = re.findall(r"""<a\s[^>]*href=["']([^"']+)["']""", body, flags=re.IGNORECASE)
            links = [(Path(urlsplit(h).path).name, html.unescape(h)) for h in hrefs]
        found = [url for name, url in links if name == self.filename]
        return urljoin(page, found[0]) if found else None

    def _download(self, opener: urllib.request.OpenerDirector, url: str, path: Path) -> Path:
        with opener.open(url, timeout=600) as response:
            path.write_bytes(response.read())
        digest = sha256(path)
        if digest != self.sha256:
            raise SystemExit(
                f"{self.filename} from {url}: sha256 {digest} differs from the pinned {self.sha256}"
            )
        return path


def pip_config() -> Dict[str, str]:
    """pip's settings as ``pip config list`` gives them (its files, then PIP_* variables, the
    later winning), by name: ``index-url``, ``proxy``, ``cert``, ..."""
    try:
        listed = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    settings = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if section in ("global", "install", "download", ":env:"):
            settings[name] = value.strip("'\"")
    return settings


def simple_indexes(config: Dict[str, str]) -> List[str]:
    """pip's index-url and extra-index-urls, then PyPI's, each once."""
    urls = [config.get("index-url", ""), *config.get("extra-index-url", "").split(), PYPI_SIMPLE]
    return list(dict.fromkeys(url.rstrip("/") for url in urls if url))


def url_opener(config: Dict[str, str]) -> urllib.request.OpenerDirector:
    """urllib with pip's proxy and certificate bundle, where pip has them."""
    handlers: List[urllib.request.BaseHandler] = []
    if config.get("proxy"):
        proxy = config["proxy"]
        handlers.append(urllib.request.ProxyHandler({"http": proxy, "https": proxy}))
    if config.get("cert"):
        context = ssl.create_default_context(cafile=config["cert"])
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers)


V06_SDIST = PyPIFile(
    "pb1-detectron2",
    "pb1-detectron2-0.6.tar.gz",
    "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29",
)
PYPI_MAIN_WHEEL = PyPIFile(
    "sal-detectron2",
    "sal_detectron2-0.7.2-cp310-none-any.whl",
    "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561",
)

# Detectron2's own install_requires (main branch), for trees that come without a setup.py.
REQUIREMENTS = [
    "Pillow>=7.1", "matplotlib", "pycocotools>=2.0.2", "termcolor>=1.1", "yacs>=0.1.8",
    "tabulate", "cloudpickle", "tqdm>4.29.0", "tensorboard", "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10", "omegaconf>=2.1,<2.4", "hydra-core>=1.1", "black", "packaging",
]  # fmt: skip

SETUP_FOR_PACKAGE = """from setuptools import find_packages, setup

setup(
    name="detectron2",
    version={version!r},
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={{"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}},
    install_requires={requirements!r},
)
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_detectron2_dir() -> Optional[Path]:
    """The importable ``detectron2`` package directory, found without importing it (by every
    finder of ``sys.meta_path``: an editable install, ``pip install -e``, has its own)."""
    spec = importlib.util.find_spec("detectron2")
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


# --- getting a source tree ------------------------------------------------------------------------


def source_root(folder: Path) -> Path:
    """The folder at or one level below ``folder`` that holds the ``detectron2`` package."""
    for candidate in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if (candidate / "detectron2" / "__init__.py").is_file():
            return candidate
    raise SystemExit(f"{folder}: no detectron2/__init__.py in it or one folder below")


def clone(url: str, work: Path) -> tuple[Path, str]:
    """``git clone --depth 1`` of ``url`` (``git+`` prefix and ``@ref`` suffix allowed)."""
    url = url.removeprefix("git+")
    match = re.fullmatch(r"(.+?\.git|[^@]+)(?:@([\w./-]+))?", url)
    url, ref = (match.group(1), match.group(2)) if match else (url, None)
    dest = work / "detectron2-git"
    cmd = [
        "git",
        "clone",
        "-q",
        "--depth",
        "1",
        *(["--branch", ref] if ref else []),
        url,
        str(dest),
    ]
    subprocess.run(cmd, check=True, timeout=GIT_TIMEOUT_S, capture_output=True, text=True)
    commit = subprocess.run(
        ["git", "-C", str(dest), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    return dest, f"{url}{'@' + ref if ref else ''} commit {commit}"


def unpack(archive: Path, work: Path) -> tuple[Path, str]:
    """A ``.tar.gz``/``.tgz``/``.tar``/``.zip`` source archive, or a wheel."""
    dest = work / "detectron2-unpacked"
    what = f"{archive.name} (sha256 {sha256(archive)[:16]}…)"
    if archive.suffix in (".zip", ".whl"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    else:
        with tarfile.open(archive) as tar:
            commit = tar.pax_headers.get("comment", "")  # git archive writes the commit here
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12: refuse unsafe members
                tar.extractall(dest, filter="data")
            else:
                tar.extractall(dest)
        if re.fullmatch(r"[0-9a-f]{40}", commit):
            what += f", git archive of commit {commit}"
    return source_root(dest), what


def obtain(source: str, work: Path) -> tuple[Path, str]:
    """A writable source tree from ``source`` and a line saying what it is; a source that cannot
    be read, copied or cloned ends the run with one line that says why."""
    path = Path(source).expanduser()
    if path.is_dir():
        tree = work / "detectron2-copy"
        ignore = shutil.ignore_patterns(".git", "build", "*.so", "__pycache__")
        try:
            shutil.copytree(source_root(path.resolve()), tree, ignore=ignore)
        except shutil.Error as e:  # every file that failed: the first one said
            failures = e.args[0]
            first, _, why = failures[0]
            raise SystemExit(
                f"--source {source}: {len(failures)} files of the folder cannot be copied, the "
                f"first {first} ({why})"
            ) from e
        except OSError as e:
            raise SystemExit(f"--source {source}: the folder cannot be copied ({e})") from e
        return tree, f"folder {path.resolve()}"
    if path.is_file():
        try:
            return unpack(path.resolve(), work)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
            raise SystemExit(f"--source {source}: not a readable archive or wheel ({e})") from e
    if is_git_url(source):
        return _clone_named(source, work)
    raise SystemExit(f"--source {source!r}: no such file or folder, and not a git URL")


def is_git_url(source: str) -> bool:
    return bool(re.match(r"(git\+)?(https?|ssh|git|file)://", source)) or source.endswith(".git")


def _clone_named(url: str, work: Path) -> tuple[Path, str]:
    """:func:`clone`, its failures said in one line."""
    try:
        return clone(url, work)
    except FileNotFoundError as e:
        raise SystemExit(
            f"--source {url}: git is not installed, and the source is a git URL"
        ) from e
    except subprocess.CalledProcessError as e:
        lines = (e.stderr or "").strip().splitlines()
        fatal = [line for line in lines if line.startswith("fatal:")]
        why = (fatal or lines or [f"exit status {e.returncode}"])[0]
        raise SystemExit(f"--source {url}: git cannot clone it ({why})") from e
    except subprocess.TimeoutExpired as e:
        raise SystemExit(f"--source {url}: git took over {GIT_TIMEOUT_S} s to clone it") from e


def obtain_main(work: Path) -> tuple[Path, str]:
    """GitHub's main branch, else the newest Detectron2 sources on PyPI."""
    try:
        return clone(GITHUB, work)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        reason = (getattr(e, "stderr", None) or str(e)).strip().splitlines()[-1]
        print(f"[detectron2] {GITHUB} cannot be cloned ({reason}); taking the newest Detectron2 "
              f"sources on PyPI instead: {PYPI_MAIN_WHEEL.filename}")  # fmt: skip
        tree, what = unpack(PYPI_MAIN_WHEEL.fetch(work), work)
        return tree, f"PyPI {what}"


# --- making it installable without a compiler ----------------------------------------------


def prepare_tree(tree: Path) -> None:
    """No extension built, model-zoo configs kept, our ``_C``, no top-level ``tools`` package."""
    setup_py = tree / "setup.py"
    if setup_py.is_file():
        text = setup_py.read_text()
        patched = text.replace("ext_modules=get_extensions(),", "ext_modules=[],")
        patched = re.sub(r'\s*"panopticapi @ https://[^"]+",', "", patched)
        if "ext_modules=[]" not in patched:
            raise SystemExit(f"unexpected {setup_py}: cannot find ext_modules=get_extensions()")
        setup_py.write_text(patched)
        zoo = tree / "detectron2" / "model_zoo" / "configs"
        if zoo.is_dir() and not (tree / "configs").exists():  # v0.6's setup.py copies from here
            shutil.move(str(zoo), str(tree / "configs"))
    else:  # a wheel's package alone: its configs already lie in model_zoo/configs
        version = re.search(
            r'__version__ = "([^"]+)"', (tree / "detectron2" / "__init__.py").read_text()
        ).group(1)
        setup_py.write_text(SETUP_FOR_PACKAGE.format(version=version, requirements=REQUIREMENTS))
        for metadata in tree.glob("*.dist-info"):
            shutil.rmtree(metadata)
    for compiled in (tree / "detectron2").glob("_C*.so"):
        compiled.unlink()
    shutil.copyfile(STAND_IN, tree / "detectron2" / "_C.py")
    (tree / "tools" / "__init__.py").unlink(missing_ok=True)


def install(tree: Path, constraints: Optional[str]) -> None:
    prepare_tree(tree)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation"]
    if constraints:
        cmd += ["-c", constraints]
    subprocess.run(cmd + [str(tree)], check=True)


def requested(version: str, source: Optional[str]) -> str:
    return f"{version} from {source}" if source else version


def source_digest(source: Optional[str]) -> Optional[str]:
    """The sha256 of a source that is a file (an archive or wheel changes under its path); ""
    for none or another kind of source; None for a path that is gone (removed since)."""
    if not source:
        return ""
    path = Path(source).expanduser()
    if path.is_file():
        return sha256(path)
    return "" if path.exists() or is_git_url(source) else None


def installed_as_asked(record: Path, want: str, digest: Optional[str]) -> Optional[str]:
    """What ``record`` says is installed, where that is what ``want`` and ``digest`` ask (a
    digest of None, a source gone since, asks the copy installed from it)."""
    if not record.is_file():
        return None
    lines = record.read_text().splitlines()
    asked, installed = (lines + ["", ""])[:2]
    recorded_digest = lines[2] if len(lines) > 2 else ""
    return installed if asked == want and digest in (None, recorded_digest) else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report a compiled Detectron2")
    parser.add_argument("--version", choices=["main", "0.6"], default="main")
    parser.add_argument("--source", help="git URL, source archive, source folder or wheel (main)")
    parser.add_argument("--constraints", help="pip constraints file")
    args = parser.parse_args()
    if args.source and args.version != "main":
        parser.error("--source gives Detectron2's newest sources: use it with --version main")

    pkg = find_detectron2_dir()
    compiled = compiled_extension(pkg) if pkg else None
    if args.check:
        print(f"compiled Detectron2: {compiled}" if compiled else "no compiled Detectron2")
        return 0 if compiled else 1
    if compiled:
        print(f"[detectron2] using the compiled Detectron2 at {compiled}; installing nothing")
        return 0
    want, digest = requested(args.version, args.source), source_digest(args.source)
    installed = installed_as_asked(RECORD, want, digest)
    if pkg and stand_in_is_current(pkg) and installed is not None:
        gone = f"; {args.source} is gone since, the copy is kept" if digest is None else ""
        print(f"[detectron2] already installed at {pkg}: {installed}{gone}")
        return 0
    with tempfile.TemporaryDirectory(prefix="htc-d2-") as tmp:
        work = Path(tmp)
        if args.version == "0.6":
            tree, what = unpack(V06_SDIST.fetch(work), work)
            what = f"v0.6, PyPI {what}"
        elif args.source:
            tree, what = obtain(args.source, work)
        else:
            tree, what = obtain_main(work)
        print(f"[detectron2] installing {what} with the pure-Python _C")
        install(tree, args.constraints)
    RECORD.write_text(f"{want}\n{what}\n{digest or ''}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
