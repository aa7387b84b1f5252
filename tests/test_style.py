"""The code base stays ruff clean (lint and format), as the README promises."""

import importlib.util
import subprocess
import sys

import pytest

from conftest import ROOT


def test_ruff_lint_and_format():
    if importlib.util.find_spec("ruff") is None:
        pytest.fail(
            f"ruff is not installed in {sys.prefix}, so the style cannot be checked (this is not a "
            "defect of the code): pip install ruff, or make the venv with bash scripts/setup.sh",
            pytrace=False,
        )
    for args in (["check"], ["format", "--check"]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *args, str(ROOT)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
