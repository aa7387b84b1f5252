"""Training on SLURM through submitit, requeued after a preemption or time-out with no work lost.

``train_net.py --slurm --nodes N --gpus-per-node G ...`` submits one task per node; each runs
Detectron2's launch over its G GPUs (:class:`PreemptibleTraining`). When SLURM signals the
job's end (submitit asks for ``--signal USR2@S``), every process finishes the iteration in flight,
the ranks agree on the last one, rank 0 saves a checkpoint there with every rank's RNG states
(:class:`PreemptionHook`), and only then is the signal handed to submitit, which calls
:meth:`PreemptibleTraining.checkpoint` and requeues the job with ``--resume``. The resumed run
continues the schedule, the data order (``DATALOADER.RESUMABLE``, set for every SLURM job) and
``metrics.json`` from the next iteration.
"""

import argparse
import copy
import functools
import importlib
import logging
import os
import random
import re
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Tuple

import torch.multiprocessing as mp
import yaml
from detectron2.config import CfgNode
from detectron2.engine import HookBase
from detectron2.utils import comm

from .distributed import launch_from_args
from .resume import ExactResume

logger = logging.getLogger(__name__)
STOP_SIGNAL = signal.SIGUSR2  # submitit's signal for a preemption or time-out (its default)
# Set by this process's signal handler, which must not take the Event's lock: the handler runs
# in the thread that may hold it (in Event.is_set).
_stop_signalled = False
_training_pid = 0  # the process whose SIGTERM is ignored; its forked children keep the default


class TrainingPreempted(Exception):
    """Raised in every rank after the preemption checkpoint is saved, to leave the loop."""


class PreemptionHook(HookBase):
    """After each step, the ranks agree whether a stop was asked of any of them; if so, the
    checkpoint of this iteration is saved with every rank's RNG states and training ends
    (:class:`TrainingPreempted`). Register it last, so that the iteration's other hooks ran."""

    def __init__(self, stop: Any, saved: Any):
        """``stop``: the multiprocessing Event the job's signal handler sets; ``saved``: the one
        this hook sets once the checkpoint is written."""
        self.stop, self.saved = stop, saved

    def after_step(self) -> None:
        if not any(comm.all_gather(_stop_signalled or self.stop.is_set())):
            return
        iteration = self.trainer.iter
        for hook in self.trainer._hooks:
            if isinstance(hook, ExactResume):
                hook.gather()
        self.trainer.checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
        comm.synchronize()
        self.saved.set()
        logger.info("Stopped after iteration %d to be requeued; its checkpoint is saved", iteration)
        raise TrainingPreempted(iteration)


class _DropPreempted(logging.Filter):
    """Detectron2's loop logs every exception that ends training; a preemption is not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], TrainingPreempted))


def _ignore(signum: int, frame: Any) -> None:
    if os.getpid() != _training_pid:  # a child that the signal reached before its reset ran
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    logger.warning("Ignored %s: the job stops at the end of an iteration", signal.strsignal(signum))


def _terminable_child() -> None:
    """In a forked child of the training process (a loader's or an evaluator's worker), SIGTERM
    terminates again from the fork on. A pool ends its workers with it (panopticapi's PQ pool
    when it is collected); a worker that had to run a Python handler to end missed it now and
    then (the pool then waited on it forever: one in about a thousand pools)."""
    if signal.getsignal(signal.SIGTERM) is _ignore:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@functools.cache
def _reset_sigterm_in_children() -> None:
    os.register_at_fork(after_in_child=_terminable_child)


def _signalled(signum: int, frame: Any) -> None:
    global _stop_signalled
    _stop_signalled = True


def run_preemptible(args: argparse.Namespace) -> Any:
    """``args.train_main(args)`` in one training process: SLURM's end-of-job signal (sent to
    every process of the job) asks for the stop, SIGTERM (sent before it on a preemption) is
    ignored, as submitit ignores it in the job's own process (not in the process's forked
    children)."""
    global _training_pid
    _training_pid = os.getpid()
    _reset_sigterm_in_children()
    previous = {s: signal.getsignal(s) for s in (STOP_SIGNAL, signal.SIGTERM)}
    signal.signal(STOP_SIGNAL, _signalled)
    signal.signal(signal.SIGTERM, _ignore)
    train_loop_logger = logging.getLogger("detectron2.engine.train_loop")
    quiet = _DropPreempted()
    train_loop_logger.addFilter(quiet)
    try:
        return args.train_main(args)
    except TrainingPreempted:
        return None
    finally:
        train_loop_logger.removeFilter(quiet)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _function_reference(func: Callable) -> Tuple[str, str, str]:
    """(folder, module, name) that import ``func`` again in the job, also when it lives in the
    script that submits (``__main__``)."""
    module = func.__module__
    folder = ""
    if module == "__main__":
        path = Path(sys.modules["__main__"].__file__).resolve()
        folder, module = str(path.parent), path.stem
    return folder, module, func.__qualname__


def _import_function(reference: Tuple[str, str, str]) -> Callable:
    """The function of :func:`_function_reference`, imported in this process."""
    folder, module, name = reference
    if folder and folder not in sys.path:
        sys.path.insert(0, folder)
    return getattr(importlib.import_module(module), name)


class PreemptibleTraining:
    """The submitit job: on each node, Detectron2's launch of ``train_main`` over the node's
    processes, with the preemption handled as the module says."""

    def __init__(self, train_main: Tuple[str, str, str], args: argparse.Namespace):
        self.train_main, self.args = train_main, args

    def __call__(self) -> None:
        env = _submitit().JobEnvironment()
        args = self._node_args(env)
        context = mp.get_context("spawn")
        args.preemption = stop, saved = context.Event(), context.Event()
        args.train_main = _import_function(self.train_main)
        submitit_handler = signal.getsignal(STOP_SIGNAL)
        signal.signal(STOP_SIGNAL, lambda *_: stop.set())  # this thread never waits on it
        try:
            launch_from_args(run_preemptible, args)
        except Exception:
            # a process the signal reached before its handler was set: its last checkpoint
            # (the signal sets ``stop``, or ``_stop_signalled`` where this process trained)
            if not (stop.is_set() or _stop_signalled):
                raise
            logger.exception("A training process ended on the stop signal")
            saved.set()
        finally:
            signal.signal(STOP_SIGNAL, submitit_handler)
        if saved.is_set():  # submitit's own path: checkpoint(), requeue, exit
            signal.raise_signal(STOP_SIGNAL)

    def _node_args(self, env) -> argparse.Namespace:
        args = copy.copy(self.args)
        args.num_machines, args.machine_rank = env.num_nodes, env.node
        args.dist_url = "auto"
        if env.num_nodes > 1:
            job = int(re.sub(r"\D", "", str(env.raw_job_id)) or 0)
            args.dist_url = f"tcp://{env.hostnames[0]}:{20000 + job % 20000}"
        print(f"Node {env.node} of {env.num_nodes}, rendezvous {args.dist_url}", flush=True)
        return args

    def checkpoint(self):
        """The requeued job (submitit calls this): the same, resuming as every run of it does."""
        return _submitit().helpers.DelayedSubmission(self)


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    """``--slurm`` and the job's resources in ``parser``; the other options go to the job."""
    group = parser.add_argument_group("SLURM (through submitit)")
    group.add_argument("--slurm", action="store_true", help="submit to SLURM instead of running")
    group.add_argument("--nodes", type=int, default=1)
    group.add_argument("--gpus-per-node", type=int, default=8,
                       help="processes per node; 0: --num-gpus CPU processes")  # fmt: skip
    group.add_argument("--partition", default="", help="SLURM partition")
    group.add_argument("--time", type=int, default=72 * 60, help="time limit, minutes")
    group.add_argument("--cpus-per-task", type=int, default=0,
                       help="CPUs of a node's task (0: 10 per GPU, or 10)")  # fmt: skip
    group.add_argument("--mem-gb", type=float, default=0, help="memory per node (0: SLURM's)")
    group.add_argument("--signal-delay", type=int, default=120,
                       help="seconds from the stop signal to the time limit")  # fmt: skip
    group.add_argument("--max-timeouts", type=int, default=3,
                       help="requeues after time-outs (preemptions do not count)")  # fmt: skip
    group.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option, e.g. constraint=volta32gb")  # fmt: skip
    group.add_argument("--job-dir", default="slurm_jobs/%j", help="submitit's logs and pickles")
    group.add_argument("--local", action="store_true",
                       help="submitit's local executor: the job on this machine")  # fmt: skip


def _submitit() -> ModuleType:
    try:
        import submitit
    except ImportError as e:
        raise ImportError("--slurm needs submitit: pip install -e .[slurm]") from e
    return submitit


def _executor(args: argparse.Namespace):
    """submitit's executor for SLURM (or the local one) with the job's resources."""
    submitit = _submitit()
    if args.local:
        if args.nodes != 1:
            raise ValueError(f"--local runs one node; got --nodes {args.nodes}")
        executor = submitit.AutoExecutor(args.job_dir, cluster="local")
    else:
        executor = submitit.AutoExecutor(args.job_dir, slurm_max_num_timeout=args.max_timeouts)
        if executor.cluster != "slurm":  # submitit falls back to running the job here
            raise ValueError(
                "--slurm: submitit finds no SLURM on this machine; submit from a machine with "
                "SLURM, or add --local to run the job here"
            )
    bad = [option for option in args.slurm_option if "=" not in option]
    if bad:
        raise ValueError(f"--slurm-option takes KEY=VALUE: got {bad}")
    extra = dict(option.split("=", 1) for option in args.slurm_option)
    executor.update_parameters(
        name="htc", nodes=args.nodes, tasks_per_node=1, gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task or 10 * max(1, args.gpus_per_node),
        timeout_min=args.time,
        **({"mem_gb": args.mem_gb} if args.mem_gb else {}),
        slurm_partition=args.partition or None, slurm_signal_delay_s=args.signal_delay,
        slurm_additional_parameters=extra,
    )  # fmt: skip
    return executor


def job_arguments(args: argparse.Namespace, seed: int) -> argparse.Namespace:
    """The arguments of the job's training processes: the node's processes, ``--resume`` (every
    run of the job, also one SLURM requeues without submitit, continues the last checkpoint in
    OUTPUT_DIR; not with ``--eval-only``, which evaluates MODEL.WEIGHTS as named), the
    resumable data order, and a seed fixed at submission (``seed`` < 0: drawn now) that every
    requeue keeps."""
    job = copy.copy(args)
    job.slurm, job.resume = False, args.resume or not args.eval_only
    if args.gpus_per_node > 0:
        job.num_gpus = args.gpus_per_node
    if seed < 0:
        seed = random.SystemRandom().randrange(2**31)
    job.opts = [*args.opts, "DATALOADER.RESUMABLE", "True", "SEED", str(seed)]
    return job


def recorded_seed(output_dir: Path) -> int:
    """The SEED of the run in ``output_dir`` (its ``config.yaml``; a job's is fixed at its
    submission), which a job resubmitted with ``--resume`` keeps; -1 where there is none."""
    path = output_dir / "config.yaml"
    if not path.is_file():
        return -1
    seed = (yaml.safe_load(path.read_text()) or {}).get("SEED", -1)
    return seed if isinstance(seed, int) else -1


def submit(train_main: Callable, args: argparse.Namespace, cfg: CfgNode):
    """Submit ``train_main(args)`` (train_net's ``main``) as a preemptible job of the config
    ``cfg``. Returns submitit's job."""
    output = Path(cfg.OUTPUT_DIR)
    holds_run = (output / "last_checkpoint").exists()
    if holds_run and not (args.resume or args.eval_only):
        raise ValueError(
            f"OUTPUT_DIR {output} holds a run (last_checkpoint), which the job would continue: "
            "give --resume to continue it, or another OUTPUT_DIR"
        )
    seed = cfg.SEED if cfg.SEED >= 0 or not args.resume else recorded_seed(output)
    if seed < 0 and args.resume and holds_run:
        raise ValueError(
            f"--resume with SEED {cfg.SEED}: the run's SEED is not in {output / 'config.yaml'}: "
            "give it (SEED N), or the resumed job's data order would not continue"
        )
    job = _executor(args).submit(
        PreemptibleTraining(_function_reference(train_main), job_arguments(args, seed))
    )
    print(f"Submitted job {job.job_id}: its log is {job.paths.stdout}", flush=True)
    return job
