"""The installed Detectron2 imports everywhere HTC runs: a fresh interpreter, a spawned process,
a data-loader worker; its ``_C`` is compiled or ours."""

import subprocess
import sys
from pathlib import Path

import torch

from conftest import ROOT

IMPORTS = (
    "import detectron2.layers, detectron2.modeling, detectron2.engine, detectron2.evaluation, "
    "detectron2.data; from detectron2.engine import DefaultPredictor; import htc"
)


def test_imports_in_fresh_interpreter_registering_no_dataset():
    """Also: importing htc (and Detectron2) puts no dataset in the catalog; the entry points
    register them (htc.data.register_builtin). Importing htc.export imports nothing of
    detectron2.export (on Detectron2 v0.6 it would stand in for that package) until an export."""
    code = IMPORTS + (
        "\nimport sys, htc.export\nfrom detectron2.data import DatasetCatalog\n"
        "print([n for n in DatasetCatalog.list() if 'htc' in n], "
        "'detectron2.export' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] False"


class _ImportingDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        exec(IMPORTS)
        return torch.tensor(i)


def test_imports_in_spawned_process_as_a_dataloader_worker():
    """A data-loader worker started by spawn: a spawned process of its own."""
    loader = torch.utils.data.DataLoader(
        _ImportingDataset(), num_workers=1, multiprocessing_context="spawn", timeout=300
    )
    assert [int(x) for x in loader] == [0]


def test_installed_C_is_compiled_or_ours():
    import detectron2._C as installed

    if installed.__file__.endswith(".py"):
        assert (
            Path(installed.__file__).read_bytes() == (ROOT / "scripts/detectron2_C.py").read_bytes()
        )
    else:
        assert not hasattr(installed, "STAND_IN")
