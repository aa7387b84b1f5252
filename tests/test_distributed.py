"""Distributed data parallel training on CPU (gloo): 2 processes on one machine, 2 "machines"
of one process each on this box, and a rendezvous that one machine never reaches."""

import contextlib
import datetime
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import DEMO_CONFIG, ROOT, SMALL, child_env, train_net_command
from htc.data.demo_data import generate_split


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 demo images, half of them without any annotation (no positive RoI)."""
    data = tmp_path_factory.mktemp("ddp_data")
    generate_split(data, "train", 6, seed=0)
    coco = json.loads((data / "train.json").read_text())
    empty = {image["id"] for image in coco["images"][::2]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] not in empty]
    (data / "train.json").write_text(json.dumps(coco))
    return data


def _job(data, out, *launch_args) -> list:
    """tests/ddp_job.py: train_net.py's parser, launch, setup and Trainer, with a report."""
    return [
        sys.executable, str(ROOT / "tests/ddp_job.py"), "--config-file", str(DEMO_CONFIG),
        *launch_args, "--data", str(data),
        *SMALL,
        "DATASETS.TRAIN", "('ddp_train',)", "DATASETS.TEST", "()",
        "MODEL.HTC.PANOPTIC_ON", "False",  # panoptic output names DATASETS.TEST[0]'s categories
        "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False",
        "MODEL.RESNETS.NORM", "naiveSyncBN",  # batch statistics shared, so buffers agree too
        "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "100", "SEED", "7",
        "OUTPUT_DIR", str(out),
    ]  # fmt: skip


def _check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def one_machine(data, tmp_path_factory):
    """The output folder of 2 processes on one machine."""
    out = tmp_path_factory.mktemp("one_machine")
    command = _job(data, out, "--num-gpus", "2", "--dist-url", "auto")
    env = child_env(CUDA_VISIBLE_DEVICES="")
    _check(subprocess.run(command, capture_output=True, text=True, env=env, timeout=900))
    return out


def _free_port() -> int:
    """A free port below the ephemeral range: the connections of the tests running beside this
    one take their ports from that range, and could take one found free there before it is
    bound."""
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ephemeral.read_text().split()[0]) if ephemeral.exists() else 32768
    below = range(10000, low)
    for port in random.SystemRandom().sample(below, min(100, len(below))):
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            return port
    with socket.socket() as sock:  # a machine whose ephemeral range leaves none below it
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.heavy
def test_two_processes_train_to_identical_weights_using_every_parameter(one_machine):
    out = one_machine
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in reports] == [2, 2]
    steps = [step for report in reports for step in report["steps"]]
    assert len(steps) == 8
    assert all(step["no_grad"] == [] for step in steps), steps
    assert any(step["gt_instances"] == 0 for step in steps)  # a batch without positives
    assert any(step["gt_instances"] > 0 for step in steps)

    weights = [torch.load(out / f"rank{r}.pth", weights_only=True) for r in range(2)]
    assert weights[0].keys() == weights[1].keys()
    different = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
    assert different == []
    start = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert all(torch.equal(start[k], weights[0]["module." + k]) for k in start)


@pytest.mark.heavy
def test_two_machines_train_as_one_machine_of_two_processes(data, one_machine, tmp_path):
    """Two processes of --num-machines 2 (one process each, a tcp rendezvous on this box) give
    one machine's weights and reports bit for bit; only machine 0 writes checkpoints, metrics
    and the config (machine 1 writes to its own OUTPUT_DIR to show it)."""
    url = f"tcp://127.0.0.1:{_free_port()}"
    outs = [tmp_path / f"machine{m}" for m in range(2)]
    env = child_env(CUDA_VISIBLE_DEVICES="")
    machines = [
        subprocess.Popen(
            _job(
                data,
                outs[m],
                "--num-gpus",
                "1",
                "--num-machines",
                "2",
                "--machine-rank",
                str(m),
                "--dist-url",
                url,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for m in range(2)
    ]
    for machine in machines:
        stdout, stderr = machine.communicate(timeout=900)
        assert machine.returncode == 0, stdout[-3000:] + stderr[-3000:]

    for rank in range(2):
        report = json.loads((outs[rank] / f"rank{rank}.json").read_text())
        assert report == json.loads((one_machine / f"rank{rank}.json").read_text())
        ours = torch.load(outs[rank] / f"rank{rank}.pth", weights_only=True)
        theirs = torch.load(one_machine / f"rank{rank}.pth", weights_only=True)
        assert [k for k in theirs if not torch.equal(ours[k], theirs[k])] == []
    final = [
        torch.load(d / "model_final.pth", weights_only=True)["model"]
        for d in (outs[0], one_machine)
    ]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[1])
    assert {"model_final.pth", "last_checkpoint", "metrics.json", "config.yaml"} <= {
        p.name for p in outs[0].iterdir()
    }
    assert sorted(p.name for p in outs[1].iterdir()) == ["log.txt.rank1", "rank1.json", "rank1.pth"]


def test_a_machine_that_never_arrives_is_named_within_the_timeout(tmp_path):
    url = f"tcp://127.0.0.1:{_free_port()}"
    command = train_net_command(
        "--num-gpus", "1", "--num-machines", "2", "--machine-rank", "0", "--dist-url", url,
        "--dist-timeout", "1", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path),
    )  # fmt: skip
    start = time.monotonic()
    result = subprocess.run(
        command, capture_output=True, text=True, env=child_env(CUDA_VISIBLE_DEVICES=""), timeout=300
    )
    assert result.returncode != 0
    assert f"rank 0 of 2: the rendezvous at {url} failed within 1 s" in result.stderr
    assert "1/2 clients joined" in result.stderr
    assert time.monotonic() - start < 60  # 1 s of waiting, and the start-up


def test_a_machine_of_one_process_runs_it_in_this_process(monkeypatch):
    """Without CUDA, the one process of a machine is the launching one (no spawned copy)."""
    from htc import distributed

    calls = []
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed, "_cpu_worker", lambda *a: calls.append((os.getpid(), a)))
    monkeypatch.setattr(distributed.mp, "spawn", lambda *a, **k: pytest.fail("spawned"))
    url, timeout = "tcp://127.0.0.1:1", datetime.timedelta(seconds=5)
    distributed.launch(print, 1, num_machines=2, machine_rank=1, dist_url=url, timeout=timeout)
    assert calls == [(os.getpid(), (0, print, 2, 1, 1, url, (), timeout))]


def test_processes_of_one_machine_meet_at_a_file_not_a_port(monkeypatch):
    """--dist-url auto: the workers meet at a file in a folder of their own, removed when they
    end (a port found free and let go could be taken by another process before they bind it)."""
    from htc import distributed

    spawned = []

    def spawn(worker, nprocs, args, daemon):
        url = args[4]
        folder = Path(url.removeprefix("file://")).parent
        spawned.append((nprocs, args[1:4], url.startswith("file://"), folder.is_dir(), folder))

    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed.mp, "spawn", spawn)
    distributed.launch(print, 2)
    [(nprocs, world_per_machine_rank, is_file, existed, folder)] = spawned
    assert (nprocs, world_per_machine_rank, is_file, existed) == (2, (2, 2, 0), True, True)
    assert not folder.exists()


def test_no_processes_asked_runs_in_this_process(monkeypatch):
    """--num-gpus 0 trains here, as Detectron2's launch does (spawning 0 processes did nothing
    and exited 0)."""
    from htc import distributed

    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed.mp, "spawn", lambda *a, **k: pytest.fail("spawned"))
    ran = []
    distributed.launch(lambda: ran.append(os.getpid()), 0)
    assert ran == [os.getpid()]


@pytest.mark.parametrize(
    "per_machine, machines, rank, refused",
    [
        (1, 2, 2, "--machine-rank 2 of --num-machines 2: the ranks of the machines are 0 to 1"),
        (2, 1, 1, "--machine-rank 1 of --num-machines 1"),
        (0, 2, 1, "--num-machines 2 with --num-gpus 0: each machine needs at least one"),
    ],
)
def test_machines_that_cannot_meet_are_refused_before_anything_runs(
    per_machine, machines, rank, refused
):
    """A rank outside the machines waited the whole --dist-timeout (30 minutes) at the
    rendezvous; machines of no process trained alone, each as rank 0, each writing."""
    from htc import distributed

    with pytest.raises(ValueError, match=refused):
        distributed.launch(pytest.fail, per_machine, machines, rank, "tcp://127.0.0.1:1")


@pytest.fixture
def in_this_process():
    """Detectron2's local process group is made once per process: forgotten after the test."""
    from htc.distributed import _forget_process_groups

    yield
    _forget_process_groups()


def test_a_machine_of_one_process_leaves_no_process_group_behind(monkeypatch, in_this_process):
    """The worker run in this process takes its process groups with it when it ends, by an
    error too, as a spawned one would: a later launch in the process starts afresh."""
    from detectron2.utils import comm

    from htc import distributed

    worker = distributed._cpu_worker

    def alone(local_rank, main, world, per_machine, machine, *rest):  # a world of this process
        worker(local_rank, main, 1, 1, 0, *rest)

    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed, "_cpu_worker", alone)
    seen = []

    def main(fails: bool) -> None:
        seen.append((torch.distributed.get_world_size(), comm.get_local_size()))
        if fails:
            raise ValueError("the job failed")

    for fails in (True, False, False):
        url, timeout = f"tcp://127.0.0.1:{_free_port()}", datetime.timedelta(seconds=60)
        with pytest.raises(ValueError) if fails else contextlib.nullcontext():
            distributed.launch(
                main, 1, num_machines=2, dist_url=url, args=(fails,), timeout=timeout
            )
        assert not torch.distributed.is_initialized()
    assert seen == [(1, 1)] * 3


@pytest.mark.parametrize("fails", [False, True])
def test_a_worker_destroys_its_groups_when_its_job_ends(fails, in_this_process):
    """Left to the interpreter's teardown, gloo's groups abort the process now and then; after an
    error they are left (a destroy can hang on ranks still in a collective) and the error
    propagates unchanged."""
    from detectron2.utils import comm

    from htc.distributed import _cpu_worker

    def main():
        assert torch.distributed.is_initialized() and comm.get_local_size() == 1
        if fails:
            raise ValueError("the job failed")

    url = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(ValueError, match="the job failed") if fails else contextlib.nullcontext():
        _cpu_worker(0, main, 1, 1, 0, url, (), datetime.timedelta(seconds=60))
    assert torch.distributed.is_initialized() == fails
    if fails:
        torch.distributed.destroy_process_group()
