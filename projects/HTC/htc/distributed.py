"""Multi-process training on CPU (gloo) as on CUDA (NCCL), with any Detectron2 version.

Every version's ``create_ddp_model`` hands torch's DistributedDataParallel
``device_ids=[local_rank]``, which torch refuses for a CPU model: :func:`cpu_capable_ddp`.
Detectron2 v0.6's ``launch`` asserts CUDA (its main branch, which still calls itself 0.6, falls
back to gloo): without CUDA, :func:`launch` starts the processes on gloo itself, with the ranks
and local process group that Detectron2's would give them, on every version; with CUDA it is
Detectron2's.
"""

import argparse
import contextlib
import datetime
import tempfile
from typing import Callable, Iterator

import detectron2.engine.defaults as d2_defaults
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import default_argument_parser
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm


def launch(
    main_func: Callable,
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = "auto",
    args: tuple = (),
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Detectron2's ``launch``; on a machine without CUDA, one gloo process per
    ``num_processes_per_machine`` with the ranks and local process group Detectron2 gives (a
    machine of one process runs it in this process: a spawned one would only add its start-up).
    ``timeout`` bounds the wait for every machine's processes at the rendezvous, and then each
    collective operation. Each process destroys its process groups when ``main_func`` ends."""
    _check_machines(num_processes_per_machine, num_machines, machine_rank)
    world_size = num_machines * num_processes_per_machine
    if world_size <= 1:  # --num-gpus 0 too, as Detectron2's
        main_func(*args)
        return
    if torch.cuda.is_available():
        d2_launch(
            _run_then_destroy_groups, num_processes_per_machine, num_machines, machine_rank,
            dist_url, (main_func, *args), timeout=timeout,
        )  # fmt: skip
        return
    with _rendezvous(dist_url, num_machines) as url:
        worker_args = (
            main_func, world_size, num_processes_per_machine, machine_rank, url, args, timeout,
        )  # fmt: skip
        if num_processes_per_machine == 1:
            try:
                _cpu_worker(0, *worker_args)
            finally:
                _forget_process_groups()
            return
        mp.spawn(_cpu_worker, nprocs=num_processes_per_machine, args=worker_args, daemon=False)


def _check_machines(per_machine: int, num_machines: int, machine_rank: int) -> None:
    """Refuse machine arguments that cannot meet: a rank outside the machines (it waited the
    whole timeout at the rendezvous), or several machines of no process (each trained alone,
    as rank 0)."""
    if num_machines < 1:
        raise ValueError(f"--num-machines {num_machines}: give 1 or more")
    if not 0 <= machine_rank < num_machines:
        raise ValueError(
            f"--machine-rank {machine_rank} of --num-machines {num_machines}: the ranks of the "
            f"machines are 0 to {num_machines - 1}"
        )
    if num_machines > 1 and per_machine < 1:
        raise ValueError(
            f"--num-machines {num_machines} with --num-gpus {per_machine}: each machine needs "
            "at least one process"
        )


@contextlib.contextmanager
def _rendezvous(dist_url: str, num_machines: int) -> Iterator[str]:
    """``dist_url``; for "auto", a file in a folder of its own, removed after the block (not a
    free TCP port: one found free and let go can be taken by another process's connection in
    the seconds before the workers bind it)."""
    if dist_url != "auto":
        yield dist_url
        return
    if num_machines != 1:
        raise ValueError("--dist-url auto works on one machine; give tcp://HOST:PORT")
    with tempfile.TemporaryDirectory(prefix="htc-rendezvous-") as folder:
        yield f"file://{folder}/store"


def _cpu_worker(
    local_rank: int,
    main_func: Callable,
    world_size: int,
    per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: tuple,
    timeout: datetime.timedelta,
) -> None:
    rank = machine_rank * per_machine + local_rank
    try:
        dist.init_process_group(
            "gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout
        )
    except RuntimeError as error:  # torch's DistStoreError and DistNetworkError derive from it
        raise RuntimeError(
            f"rank {rank} of {world_size}: the rendezvous at {dist_url} failed within "
            f"{timeout.total_seconds():g} s (--dist-timeout): {error}. Every machine must start "
            "with the same --num-machines, --num-gpus and --dist-url (machine 0's address and "
            "a port open to the others), each with its own --machine-rank"
        ) from error
    _set_local_process_group(world_size, per_machine, machine_rank)
    comm.synchronize()
    _run_then_destroy_groups(main_func, *args)


def _run_then_destroy_groups(main_func: Callable, *args) -> None:
    """``main_func``, then every process group destroyed: left to the interpreter's teardown,
    gloo's threads still hold the tensors of finished work, and freeing them then aborts the
    process now and then ("terminate called without an active exception"). Not after an
    error: other ranks may still be in a collective, where a destroy can hang (NCCL), and the
    error must reach ``mp.spawn``, which ends them (or the caller, where the worker is the
    launching process)."""
    main_func(*args)
    if dist.is_initialized():
        dist.destroy_process_group()


def _forget_process_groups() -> None:
    """After a worker run in the launching process, whatever its end, the process groups that a
    spawned worker's end would take with it: gloo's destroyed (on CPU no destroy waits for a
    peer), Detectron2's local group forgotten, so that a later launch starts afresh."""
    if dist.is_initialized():
        dist.destroy_process_group()
    comm._LOCAL_PROCESS_GROUP = None
    if hasattr(comm, "create_local_process_group"):  # not in v0.6
        comm.create_local_process_group.cache_clear()


def _set_local_process_group(world_size: int, per_machine: int, machine_rank: int) -> None:
    """The group of this machine's processes, which ``comm.get_local_rank`` reads: made by
    ``comm.create_local_process_group`` where Detectron2 has it (it refuses a second one),
    else (v0.6) set as that function sets it."""
    if hasattr(comm, "create_local_process_group"):
        comm.create_local_process_group(per_machine)
        return
    for machine in range(world_size // per_machine):
        group = dist.new_group(list(range(machine * per_machine, (machine + 1) * per_machine)))
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """Detectron2's ``create_ddp_model``, giving a CPU model no ``device_ids``."""
    if next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _d2_create_ddp_model(model, **kwargs)


_d2_create_ddp_model = d2_defaults.create_ddp_model


@contextlib.contextmanager
def cpu_capable_ddp() -> Iterator[None]:
    """Within the block, ``DefaultTrainer.__init__`` wraps CPU models in DDP correctly (it calls
    the ``create_ddp_model`` of its own module)."""
    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = _d2_create_ddp_model


def argument_parser() -> argparse.ArgumentParser:
    """Detectron2's ``default_argument_parser`` with ``--dist-timeout``."""
    parser = default_argument_parser()
    add_timeout_argument(parser)
    return parser


def add_timeout_argument(parser: argparse.ArgumentParser) -> None:
    """``--dist-timeout`` (seconds) in ``parser``."""
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT.total_seconds(),
        help="seconds to wait for every machine at the rendezvous (and, on CPU, in collectives)",
    )


def launch_from_args(main_func: Callable, args: argparse.Namespace) -> None:
    """:func:`launch` of ``main_func(args)`` with the processes, address and timeout that
    :func:`argument_parser` put in ``args`` (--num-gpus, --num-machines, ...)."""
    launch(
        main_func,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        timeout=datetime.timedelta(seconds=args.dist_timeout),
    )
