"""Exact resumption (DATALOADER.RESUMABLE) and SLURM's requeue (htc/slurm.py): a training run
stopped anywhere, by SIGKILL or by submitit's preemption signal, resumes and trains the weights
of the uninterrupted run, bit for bit, with the same evaluation."""

import argparse
import contextlib
import itertools
import logging
import os
import random
import re
import signal
import subprocess
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from detectron2.data.common import AspectRatioGroupedDataset
from detectron2.data.samplers import TrainingSampler
from filelock import FileLock
from torch.utils.data import DataLoader

from conftest import SMALL, child_env, metrics_entries, train_net_command, training_iterations
from htc import slurm
from htc.data.resumable import PositionBatchSampler, PositionMappedDataset
from htc.resume import ExactResume

RUN = [
    *SMALL, "SOLVER.MAX_ITER", "8", "DETERMINISTIC", "True", "SEED", "3",
    "DATALOADER.RESUMABLE", "True", "INPUT.MIN_SIZE_TRAIN", "(96, 128)", "TEST.EVAL_PERIOD", "4",
]  # fmt: skip


def _result(output) -> tuple:
    """The final weights and the last evaluation of a run."""
    weights = torch.load(output / "model_final.pth", map_location="cpu", weights_only=True)
    evaluation = [m for m in metrics_entries(output) if "segm/AP" in m][-1]
    return weights["model"], evaluation


def _assert_same_result(got: tuple, want: tuple) -> None:
    assert got[0].keys() == want[0].keys()
    assert [name for name in want[0] if not torch.equal(got[0][name], want[0][name])] == []
    assert got[1] == want[1]


@pytest.fixture(scope="session")
def uninterrupted(workspace, tmp_path_factory):
    """The run trained once for all of pytest's worker processes (they share the parent of
    their temporary folders)."""
    output = tmp_path_factory.getbasetemp().parent / "uninterrupted"
    with FileLock(f"{output}.lock"):
        if not (output / "model_final.pth").is_file():
            env = child_env(DETECTRON2_DATASETS=str(workspace))
            command = train_net_command(*RUN, "OUTPUT_DIR", str(output))
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            assert result.returncode == 0, result.stderr[-3000:]
    return _result(output)


def _wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.05)


@pytest.mark.heavy
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_weights(
    workspace, uninterrupted, tmp_path
):
    output = tmp_path / "out"
    env = child_env(DETECTRON2_DATASETS=str(workspace))
    command = train_net_command(*RUN, "SOLVER.CHECKPOINT_PERIOD", "1", "OUTPUT_DIR", str(output))
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tag = output / "last_checkpoint"
    _wait_for(lambda: tag.exists() or proc.poll() is not None, "the first checkpoint")
    time.sleep(random.uniform(0.0, 1.0))  # somewhere in training, saving or evaluating
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training ended before the kill"

    checkpoint = torch.load(output / tag.read_text().strip(), weights_only=True)  # complete
    saved = checkpoint["iteration"]
    assert len(checkpoint["trainer"]["hooks"]["ExactResume"]["rng_states"]) == 1
    result = subprocess.run(
        [*command[:2], "--resume", *command[2:]], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert f"Starting training from iteration {saved + 1}" in log
    if saved < 7:
        assert f"Resumed the data order and RNG states at iteration {saved + 1}" in log
        assert max(training_iterations(output)) == 7
    _assert_same_result(_result(output), uninterrupted)


def _children(pid: int) -> list:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid):
            found.append(int(entry))
    return found


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.heavy
def test_a_preempted_slurm_job_requeues_and_trains_the_uninterrupted_weights(
    workspace, uninterrupted, tmp_path
):
    """submitit's local executor runs the job; its task gets the signal that submitit's
    controller sends at the time limit (and SLURM at --signal), mid-way through training."""
    output, jobs = tmp_path / "out", tmp_path / "jobs"
    command = train_net_command(
        "--slurm", "--local", "--gpus-per-node", "0", "--job-dir", str(jobs),
        *RUN, "OUTPUT_DIR", str(output),
    )  # fmt: skip
    env = child_env(DETECTRON2_DATASETS=str(workspace))
    # A file, not a pipe: the local job inherits it, and would hold a pipe open until its end.
    with open(tmp_path / "submit.log", "w") as log:
        subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    job = int(re.search(r"Submitted job (\d+)", (tmp_path / "submit.log").read_text()).group(1))
    task_log = jobs / f"{job}_0_log.out"
    try:
        _wait_for(lambda: task_log.exists() and "Starting training" in task_log.read_text(),
                  "the job's training")  # fmt: skip
        (task,) = _children(job)  # the controller's one task
        os.kill(task, signal.SIGUSR2)
        _wait_for(lambda: not _running(job), "the requeued job's end")
    finally:
        for pid in [*_children(job), job]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    log = task_log.read_text()
    stopped = re.search(r"Stopped after iteration (\d+) to be requeued", log)
    assert stopped, log[-3000:]
    assert "Requeued job" in log
    start = int(stopped.group(1)) + 1
    assert f"Starting training from iteration {start}" in log
    assert f"Resumed the data order and RNG states at iteration {start}" in log
    assert (jobs / f"{job}_0_result.pkl").is_file(), "the requeued job completed"
    assert training_iterations(output) == sorted(set(training_iterations(output)))
    _assert_same_result(_result(output), uninterrupted)


def test_a_slurm_job_resumes_unless_it_only_evaluates():
    """An evaluation evaluates MODEL.WEIGHTS as named, not the last checkpoint of OUTPUT_DIR."""
    args = argparse.Namespace(resume=False, eval_only=False, gpus_per_node=2, opts=["A", "1"])
    job = slurm.job_arguments(args, seed=7)
    assert job.resume and job.num_gpus == 2 and not job.slurm
    assert job.opts == ["A", "1", "DATALOADER.RESUMABLE", "True", "SEED", "7"]
    evaluation = argparse.Namespace(**dict(vars(args), eval_only=True))
    assert not slurm.job_arguments(evaluation, seed=7).resume
    evaluation.resume = True  # the last checkpoint, asked for
    assert slurm.job_arguments(evaluation, seed=7).resume


def _submission(tmp_path, **args) -> argparse.Namespace:
    jobs = str(tmp_path / "jobs")
    defaults = dict(resume=False, eval_only=False, gpus_per_node=0, opts=[], local=False,
                    nodes=1, job_dir=jobs, max_timeouts=3, slurm_option=[])  # fmt: skip
    return argparse.Namespace(**dict(defaults, **args))


def test_a_slurm_submission_that_would_not_do_as_asked_is_refused(tmp_path, monkeypatch):
    """Without SLURM, submitit ran the job here (8 processes on a login node); a new job into
    a run's OUTPUT_DIR continued that run (trained nothing, with the new config written over
    the run's); a job resubmitted with --resume drew a new SEED (the data order did not
    continue): it keeps the run's."""
    output = tmp_path / "out"
    output.mkdir()
    cfg = SimpleNamespace(OUTPUT_DIR=str(output), SEED=-1)
    submitit = slurm._submitit()
    monkeypatch.setattr(submitit.AutoExecutor, "which", staticmethod(lambda: "local"))
    with pytest.raises(ValueError, match="submitit finds no SLURM on this machine.* --local"):
        slurm.submit(print, _submission(tmp_path), cfg)
    with pytest.raises(ValueError, match="--slurm-option takes KEY=VALUE: got \\['constraint'\\]"):
        slurm.submit(print, _submission(tmp_path, local=True, slurm_option=["constraint"]), cfg)
    (output / "last_checkpoint").write_text("model_0000099.pth")
    (output / "config.yaml").write_text("SEED: 409212831\nOUTPUT_DIR: out\n")
    with pytest.raises(ValueError, match="holds a run .*give --resume to continue it"):
        slurm.submit(print, _submission(tmp_path, local=True), cfg)
    submitted = []
    monkeypatch.setattr(slurm, "_executor", lambda args: SimpleNamespace(submit=submitted.append))
    with pytest.raises(AttributeError):  # the fake job has no id to print
        slurm.submit(print, _submission(tmp_path, local=True, resume=True), cfg)
    assert submitted[0].args.opts[-2:] == ["SEED", "409212831"]
    (output / "config.yaml").write_text("SEED: -1\n")  # overwritten by a run of no seed
    with pytest.raises(ValueError, match="SEED -1.* not in .*config.yaml: give it"):
        slurm.submit(print, _submission(tmp_path, local=True, resume=True), cfg)


def test_a_resume_with_another_seed_is_refused():
    """Its data order and augmentations would not continue, yet the log said they did."""
    loader = DataLoader(range(40), batch_sampler=PositionBatchSampler(TrainingSampler(40), 4))
    trainer = SimpleNamespace(start_iter=5, _trainer=SimpleNamespace(data_loader=loader))
    for loaded, refused in ((7, False), (None, False), (8, True)):  # None: an older checkpoint
        hook = ExactResume(checkpoint_period=10, seed=7)
        hook.trainer = trainer
        hook.load_state_dict({"images_per_batch": 4, "seed": loaded})
        if refused:
            with pytest.raises(ValueError, match="trained with SEED 8, this one has SEED 7"):
                hook.before_train()
        else:
            hook.before_train()


def test_a_job_whose_training_fails_after_the_stop_signal_is_requeued(monkeypatch):
    """The stop signal reached a training process that then failed (before its checkpoint): the
    job is requeued from the last checkpoint, also where the job's process trained (one
    process per node on CPU), whose own handler records the signal."""
    env = SimpleNamespace(num_nodes=1, node=0)
    monkeypatch.setattr(slurm, "_submitit", lambda: SimpleNamespace(JobEnvironment=lambda: env))

    def training(main, args):
        monkeypatch.setattr(slurm, "_stop_signalled", True)  # run_preemptible's handler ran
        raise OSError("the disk went away")

    monkeypatch.setattr(slurm, "launch_from_args", training)
    raised = []
    monkeypatch.setattr(slurm.signal, "raise_signal", raised.append)
    slurm.PreemptibleTraining(("", "os", "getcwd"), argparse.Namespace())()
    assert raised == [slurm.STOP_SIGNAL]  # submitit's handler: checkpoint() and requeue


def test_the_training_process_ignores_sigterm_and_its_forked_children_do_not():
    """SIGTERM (sent to every process of a preempted job) is ignored where the job trains; its
    forked children (loader and evaluator workers) have the default from the fork on, so that
    a pool can end them (a Python handler in them let panopticapi's pool hang now and then)."""
    seen = {}

    def train_main(args):
        seen["training"] = signal.getsignal(signal.SIGTERM) is slurm._ignore
        with warnings.catch_warnings():  # a fork of pytest's threaded worker that runs no code
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            os._exit(0 if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else 1)
        seen["child"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0

    before = signal.getsignal(signal.SIGTERM)
    slurm.run_preemptible(argparse.Namespace(train_main=train_main))
    assert seen == {"training": True, "child": True}
    assert signal.getsignal(signal.SIGTERM) is before


def test_batches_group_as_detectron2_does_and_start_anywhere():
    rng = random.Random(0)
    sizes = [(rng.randint(50, 100), rng.randint(50, 100)) for _ in range(40)]
    buckets = [0 if w > h else 1 for w, h in sizes]
    ours = PositionBatchSampler(TrainingSampler(len(sizes), seed=5), 3, buckets)
    got = list(itertools.islice(ours, 30))

    stream = ({"width": sizes[i][0], "height": sizes[i][1], "index": i}
              for i in TrainingSampler(len(sizes), seed=5))  # fmt: skip
    grouped = AspectRatioGroupedDataset(stream, 3)
    want = [[d["index"] for d in batch] for batch in itertools.islice(grouped, 30)]
    assert [[index for _, index in batch] for batch in got] == want
    positions = [position for batch in got for position, _ in batch]
    assert len(set(positions)) == len(positions)
    assert len({buckets[i] for _, i in got[0]}) == 1

    ours.start = 11
    assert list(itertools.islice(ours, 19)) == got[11:]


def _resumed_batches(images_per_batch: int, start: int, checkpoint: dict) -> list:
    """The first batches of a one-process run resumed at ``start`` from ``checkpoint``."""
    sampler = PositionBatchSampler(TrainingSampler(40, seed=5), images_per_batch)
    loader = DataLoader(range(40), batch_sampler=sampler)  # never iterated here
    hook = ExactResume(checkpoint_period=10)
    hook.trainer = SimpleNamespace(start_iter=start, _trainer=SimpleNamespace(data_loader=loader))
    hook.load_state_dict(checkpoint)
    hook.before_train()
    return list(itertools.islice(sampler, 6))


def test_a_resume_with_another_batch_size_continues_after_the_images_trained_on(caplog):
    """Not the batches of the new size that the first run never made: the images after those
    it trained on (batches of 4 for 5 iterations: 20 images), in batches of the new size."""
    uninterrupted = list(itertools.islice(PositionBatchSampler(TrainingSampler(40, seed=5), 4), 11))
    images = [key for batch in uninterrupted[5:] for key in batch]
    assert _resumed_batches(4, 5, {"images_per_batch": 4}) == uninterrupted[5:11]
    with caplog.at_level(logging.WARNING, logger="htc.resume"):
        resumed = _resumed_batches(2, 5, {"images_per_batch": 4})
    assert resumed == [images[k : k + 2] for k in range(0, 12, 2)]
    assert "IMS_PER_BATCH is 2, and 4 in the run of the checkpoint" in caplog.text
    assert _resumed_batches(2, 5, {})[0][0][0] == 10  # an older checkpoint: batches skipped


def _draws(d: dict):
    """A mapper that rejects image 0 and otherwise returns draws of every RNG an augmentation
    may use."""
    if d["index"] == 0:
        return None
    return d["index"], random.random(), float(np.random.rand()), float(torch.rand(1))


def _as_list(batch: list) -> list:
    return batch


def _load(num_workers: int, start: int, batches: int) -> list:
    dicts = [{"index": i, "width": 64 + (i % 3), "height": 65} for i in range(7)]
    sampler = PositionBatchSampler(TrainingSampler(len(dicts), seed=2), 2)
    sampler.start = start
    loader = DataLoader(
        PositionMappedDataset(dicts, _draws, seed=4, rank=0),
        batch_sampler=sampler, num_workers=num_workers, collate_fn=_as_list,
        generator=torch.Generator().manual_seed(1),  # the workers' seeds not drawn from torch's
    )  # fmt: skip
    return list(itertools.islice(loader, batches))


def test_each_position_maps_alike_with_any_workers_and_any_start():
    """An image's augmentation draws are a function of its position in the stream: the same
    with 0 or 2 workers, and when the loader starts mid-way; the training process's RNGs are
    left as they were. A rejected image is replaced by the same one every time."""
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    in_process = _load(num_workers=0, start=0, batches=6)
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    assert _load(num_workers=2, start=0, batches=6) == in_process
    assert _load(num_workers=0, start=4, batches=2) == in_process[4:]
    items = [item for batch in in_process for item in batch]
    assert all(index != 0 for index, *_ in items)  # rejected, replaced
    assert len({draw for _, draw, _, _ in items}) == len(items)
