"""scripts/install_detectron2.py: which Detectron2 it installs from which source, and how it makes
any of them installable without a compiler."""

import hashlib
import http.server
import importlib.abc
import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import tarfile
import threading
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, child_env

SCRIPT = ROOT / "scripts/install_detectron2.py"


def _load_installer():
    spec = importlib.util.spec_from_file_location("install_detectron2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


inst = _load_installer()
SO = f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}"
UPSTREAM_SETUP = """from setuptools import setup
setup(
    name="detectron2",
    ext_modules=get_extensions(),
    install_requires=[
        "panopticapi @ https://github.com/cocodataset/panopticapi/archive/master.zip",
        "yacs",
    ],
)
"""


def _installer(*args, pythonpath=None):
    env = child_env(pythonpath) if pythonpath else None
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60
    )


def _package(root: Path, version: str = "0.6") -> Path:
    pkg = root / "detectron2"
    (pkg / "model_zoo" / "configs" / "COCO").mkdir(parents=True)
    (pkg / "__init__.py").write_text(f'__version__ = "{version}"\n')
    (pkg / "model_zoo" / "__init__.py").write_text("")
    (pkg / "model_zoo" / "configs" / "COCO" / "m.yaml").write_text("MODEL: {}\n")
    (pkg / SO).write_bytes(b"\x7fELF compiled for another Python")
    (root / "tools").mkdir()
    (root / "tools" / "__init__.py").write_text("")
    return pkg


def _snapshot(folder: Path):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_source_tree_builds_no_extension_and_gets_our_C(tmp_path):
    pkg = _package(tmp_path)
    (tmp_path / "setup.py").write_text(UPSTREAM_SETUP)
    inst.prepare_tree(tmp_path)
    setup_py = (tmp_path / "setup.py").read_text()
    assert "ext_modules=[]," in setup_py and "get_extensions" not in setup_py
    assert "panopticapi" not in setup_py and '"yacs"' in setup_py
    assert (pkg / "_C.py").read_bytes() == inst.STAND_IN.read_bytes()
    assert not (pkg / SO).exists() and not (tmp_path / "tools" / "__init__.py").exists()
    # v0.6's setup.py installs the model-zoo configs from the tree's root
    assert (tmp_path / "configs" / "COCO" / "m.yaml").is_file()


def test_unexpected_setup_py_is_refused(tmp_path):
    _package(tmp_path)
    (tmp_path / "setup.py").write_text("from setuptools import setup\nsetup(name='x')\n")
    with pytest.raises(SystemExit, match="cannot find ext_modules=get_extensions"):
        inst.prepare_tree(tmp_path)


def test_a_wheel_of_detectron2_installs_with_its_configs(tmp_path):
    """The PyPI route unpacks a wheel built for another Python: its package alone, given a
    setup.py of ours; pip installs it with the model-zoo configs and our _C."""
    tree = tmp_path / "tree"
    _package(tree, version="0.7.2")
    (tree / "sal_detectron2-0.7.2.dist-info").mkdir()
    inst.prepare_tree(tree)
    assert not list(tree.glob("*.dist-info"))
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*cmd, "--target", str(target), str(tree)], check=True, timeout=300)
    installed = target / "detectron2"
    assert (installed / "_C.py").read_bytes() == inst.STAND_IN.read_bytes()
    assert (installed / "model_zoo" / "configs" / "COCO" / "m.yaml").is_file()
    assert not (target / "tools").exists() and not (installed / SO).exists()
    assert list(target.glob("detectron2-0.7.2.dist-info"))


def test_git_archive_names_its_commit(tmp_path):
    src = tmp_path / "src"
    _package(src / "detectron2-repo")
    archive = tmp_path / "detectron2-abc.tar.gz"
    commit = "02b5c4e295e990042a714712c21dc79b731e8833"
    with tarfile.open(archive, "w:gz", pax_headers={"comment": commit}) as tar:
        tar.add(src / "detectron2-repo", arcname="detectron2-repo")
    tree, what = inst.obtain(str(archive), tmp_path / "work")
    assert tree.name == "detectron2-repo" and (tree / "detectron2" / "__init__.py").is_file()
    assert archive.name in what and f"git archive of commit {commit}" in what


def test_source_folder_is_copied_not_changed(tmp_path):
    src = tmp_path / "checkout"
    _package(src)
    (src / "setup.py").write_text(UPSTREAM_SETUP)
    before = _snapshot(src)
    tree, what = inst.obtain(str(src), tmp_path / "work")
    inst.prepare_tree(tree)
    assert _snapshot(src) == before and str(src) in what


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(SystemExit, match="no such file or folder, and not a git URL"):
        inst.obtain(str(tmp_path / "missing.tar.gz"), tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no detectron2/__init__.py"):
        inst.obtain(str(empty), tmp_path / "work")
    checkout = tmp_path / "checkout"
    _package(checkout)
    for name in ("a.py", "b.py"):
        (checkout / "detectron2" / name).symlink_to(tmp_path / "nowhere")
    with pytest.raises(SystemExit, match=r"2 files of the folder cannot be copied, the first \S+"):
        inst.obtain(str(checkout), tmp_path / "work1")
    with pytest.raises(SystemExit, match="git cannot clone it .*nothing.git"):
        inst.obtain(f"file://{tmp_path}/nothing.git", tmp_path)
    not_a_tar = tmp_path / "x.tar.gz"
    not_a_tar.write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="not a readable archive or wheel"):
        inst.obtain(str(not_a_tar), tmp_path / "work2")
    archive = tmp_path / "cut.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(SCRIPT, arcname="detectron2/__init__.py")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])  # a cut download
    with pytest.raises(SystemExit, match="not a readable archive or wheel"):
        inst.obtain(str(archive), tmp_path / "work3")


@pytest.fixture
def json_index():
    """A PEP 691 simple index over HTTP that lists "served" alone: (its URL, the files'
    bytes by name, to fill)."""
    files = {}

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/simple/served/":
                listed = [{"filename": name, "url": f"/files/{name}"} for name in files]
                body, kind = json.dumps({"files": listed}).encode(), "application/json"
            elif self.path.removeprefix("/files/") in files:
                body, kind = files[self.path.removeprefix("/files/")], "application/octet-stream"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/simple", files
    server.shutdown()


def test_pinned_files_come_from_the_indexes_pip_is_configured_with(
    tmp_path, monkeypatch, json_index
):
    """pip's index-url and extra-index-urls are asked before PyPI's (a mirror, where PyPI
    cannot be reached): an index without the project is passed over; PEP 503 HTML and PEP 691
    JSON pages are read; the sha256 is checked whoever serves the file."""
    data = b"the sdist's bytes"
    digest = hashlib.sha256(data).hexdigest()
    html_index = tmp_path / "html" / "simple"
    (html_index / "local").mkdir(parents=True)
    (tmp_path / "html" / "files").mkdir()
    (tmp_path / "html" / "files" / "local-1.0.tar.gz").write_bytes(data)
    (html_index / "local" / "index.html").write_text(
        f"<html><body><a href='../../files/local-1.0.tar.gz#sha256={digest}'>x</a></body></html>"
    )
    url, served = json_index
    served["served-1.0.tar.gz"] = data
    monkeypatch.setenv("PIP_INDEX_URL", url)
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", html_index.as_uri())
    assert inst.simple_indexes(inst.pip_config()) == [url, html_index.as_uri(), inst.PYPI_SIMPLE]

    for project in ("served", "local"):
        (tmp_path / project).mkdir()
        pinned = inst.PyPIFile(project, f"{project}-1.0.tar.gz", digest)
        assert pinned.fetch(tmp_path / project).read_bytes() == data
    served["served-1.0.tar.gz"] = b"other bytes"
    host = url.removesuffix("/simple")
    with pytest.raises(SystemExit, match=f"from {host}/files/served-1.0.tar.gz: sha256"):
        inst.PyPIFile("served", "served-1.0.tar.gz", digest).fetch(tmp_path / "served")


def test_pip_proxy_and_certificates_are_used():
    proxy = "http://proxy.example:3128"
    opener = inst.url_opener({"proxy": proxy})
    proxies = [h for h in opener.handlers if isinstance(h, urllib.request.ProxyHandler)]
    assert proxies[0].proxies == {"http": proxy, "https": proxy}
    with pytest.raises(FileNotFoundError):  # the bundle named is the one loaded
        inst.url_opener({"cert": "/nonexistent/ca-bundle.crt"})


def test_an_editable_detectron2_is_found(tmp_path, monkeypatch):
    """Detectron2's own route, ``pip install -e``, puts a finder on sys.meta_path rather than
    the package on sys.path: its compiled _C is found through it."""
    pkg = tmp_path / "checkout" / "detectron2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / SO).write_bytes(b"\x7fELF fake compiled extension")

    class EditableFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "detectron2":
                return importlib.util.spec_from_file_location(
                    name, pkg / "__init__.py", submodule_search_locations=[str(pkg)]
                )
            return None

    monkeypatch.setattr(sys, "meta_path", [EditableFinder(), *sys.meta_path])
    monkeypatch.delitem(sys.modules, "detectron2", raising=False)
    assert inst.find_detectron2_dir() == pkg
    assert inst.compiled_extension(pkg) == pkg / SO


def test_setup_leaves_a_compiled_detectron2_alone(tmp_path):
    pkg = tmp_path / "detectron2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / SO).write_bytes(b"\x7fELF fake compiled extension")
    before = _snapshot(tmp_path)

    check = _installer("--check", pythonpath=tmp_path)
    assert check.returncode == 0 and SO in check.stdout
    run = _installer(pythonpath=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "using the compiled Detectron2" in run.stdout and "installing nothing" in run.stdout
    assert _snapshot(tmp_path) == before


def _args_of_this_venv() -> list:
    asked = (Path(sys.prefix) / "detectron2-source.txt").read_text().splitlines()[0]
    if asked == "0.6":
        return ["--version", "0.6"]
    return ["--source", asked.removeprefix("main from ")] if asked.startswith("main from ") else []


def test_setup_recognises_what_it_installed():
    check = _installer("--check")
    import detectron2._C as installed

    compiled = not installed.__file__.endswith(".py")
    assert (check.returncode == 0) == compiled
    if not compiled:
        run = _installer(*_args_of_this_venv())
        assert run.returncode == 0 and "already installed" in run.stdout, run.stdout + run.stderr


def _setup(tmp_path, *args, pythonpath=(), **env):
    """scripts/setup.sh on the default stack, whatever this suite's, with VENV in ``tmp_path``."""
    env = {"DETECTRON2": "main", "DETECTRON2_SOURCE": "", "VENV": str(tmp_path / "venv"), **env}
    return subprocess.run(
        ["bash", str(ROOT / "scripts/setup.sh"), *args],
        capture_output=True, text=True, timeout=60, env=child_env(*pythonpath, **env),
    )  # fmt: skip


def test_setup_leaves_a_folder_that_is_no_venv_alone(tmp_path):
    """VENV names a folder of the user's whose bin/python is of another Python: refused, not
    deleted and remade."""
    folder = tmp_path / "venv"
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "python").write_text("#!/bin/sh\necho 3.9\n")
    (folder / "bin" / "python").chmod(0o755)
    (folder / "results.csv").write_text("1,2\n")
    run = _setup(tmp_path, sys.executable)
    assert run.returncode == 2 and "this setup did not make it, so it is left alone" in run.stderr
    assert (folder / "results.csv").read_text() == "1,2\n"


def test_setup_names_what_it_cannot_use_before_making_a_venv(tmp_path):
    run = _setup(tmp_path, str(tmp_path / "no" / "python3"))
    assert run.returncode == 2 and "cannot run the interpreter" in run.stderr
    assert "make demo PYTHON=" in run.stderr
    run = _setup(tmp_path, sys.executable, DETECTRON2_SOURCE=str(tmp_path / "d2.tar.gz"))
    assert run.returncode == 2 and "no such file or folder, and not a git URL" in run.stderr
    assert not (tmp_path / "venv").exists()


def test_an_archive_changed_under_its_path_is_installed_again(tmp_path):
    """The record holds the source's bytes' sha256: the same path with other bytes is not
    'already installed'."""
    archive, record = tmp_path / "d2.tar.gz", tmp_path / "detectron2-source.txt"
    archive.write_bytes(b"first")
    want, digest = inst.requested("main", str(archive)), inst.source_digest(str(archive))
    record.write_text(f"{want}\nd2.tar.gz (sha256 …)\n{digest}\n")
    assert inst.installed_as_asked(record, want, digest) == "d2.tar.gz (sha256 …)"
    archive.write_bytes(b"second")
    assert inst.installed_as_asked(record, want, inst.source_digest(str(archive))) is None
    assert inst.installed_as_asked(record, inst.requested("main", None), "") is None
    archive.unlink()  # gone since: what was installed from it stands
    gone = inst.source_digest(str(archive))
    assert gone is None and inst.installed_as_asked(record, want, gone) == "d2.tar.gz (sha256 …)"


@pytest.mark.parametrize("marks", [(), (".htc-setup-stamp",), (".htc-setup-made",)])
def test_setup_remakes_only_a_venv_it_made(tmp_path, marks):
    """A venv without pip (uv makes them so; an interrupted setup leaves one) is made anew only
    where this setup made it: its stamp alone is also written into a VENV of the user's that
    it installed into. (The interpreter then asked for cannot run, so nothing is installed.)"""
    folder = tmp_path / "venv"
    (folder / "bin").mkdir(parents=True)
    (folder / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (folder / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")
    (folder / "bin" / "python").chmod(0o755)
    for mark in marks:
        (folder / mark).write_text("")
    run = _setup(tmp_path, str(tmp_path / "no" / "python3"))
    assert run.returncode == 2
    if marks == (".htc-setup-made",):
        assert "does not run pip (an interrupted setup?); making it anew" in run.stdout
        assert not folder.exists() and "cannot run the interpreter" in run.stderr
        assert list(tmp_path.iterdir()) == [], "the removal left nothing behind"
    else:
        assert "this setup did not make it, so it is left alone" in run.stderr
        assert (folder / "pyvenv.cfg").is_file()


def test_setup_keeps_a_venv_whose_recorded_source_is_gone(tmp_path):
    """A later run takes the source of the first from the venv's record. Removed since (a
    downloaded archive cleaned up), the installed copy is kept; a venv to be made anew is not
    removed, as nothing could install its Detectron2 again."""
    folder = tmp_path / "venv"
    folder.mkdir()
    (folder / ".htc-setup-made").write_text("")
    gone = tmp_path / "moved" / "d2.tar.gz"
    (folder / "detectron2-source.txt").write_text(f"main from {gone}\nd2.tar.gz\nab12\n")
    run = _setup(tmp_path, sys.executable)
    assert f"Detectron2 from {gone}, which is gone since: the installed copy is kept" in run.stdout
    assert run.returncode == 2
    assert f"its Detectron2 came from {gone}, which is gone: give DETECTRON2_SOURCE" in run.stderr
    assert sorted(p.name for p in folder.iterdir()) == [".htc-setup-made", "detectron2-source.txt"]


def test_setup_refuses_a_venvs_interpreter_with_a_compiled_detectron2(tmp_path):
    """A new venv on a venv's interpreter would not see that venv's packages."""
    pkg = tmp_path / "site" / "detectron2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / SO).write_bytes(b"\x7fELF fake compiled extension")
    if sys.prefix == sys.base_prefix:
        pytest.skip("the suite runs outside a venv: its interpreter is no venv's")
    run = _setup(tmp_path, sys.executable, pythonpath=[tmp_path / "site"])
    assert run.returncode == 2 and "is a venv's, with a compiled Detectron2" in run.stderr
    assert not (tmp_path / "venv").exists()
