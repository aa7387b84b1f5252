"""The code base stays ruff clean (lint and format), as the README promises."""

import subprocess
import sys

from conftest import ROOT


def test_ruff_lint_and_format():
    for args in (["check"], ["format", "--check"]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *args, str(ROOT)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
