"""Data-parallel training over several processes, GPUs and machines, as started by torchrun.

    torchrun --nproc_per_node=8 -m ebtrain --arch vgg16 ...

torchrun starts one process per GPU and tells each who it is through environment variables
(WORLD_SIZE, RANK, LOCAL_RANK). `setup()` joins them into one process group (NCCL for CUDA tensors,
gloo for CPU ones and for pickled objects). Without a process group every helper here does nothing,
or gives the one-process answer, so the rest of ebtrain has one code path and a plain
`python -m ebtrain` run is unchanged.

Who does what:
- every rank trains on its share of each batch (`data.BatchLoader`) through DistributedDataParallel
  (`data_parallel`), so gradients and weights are the same on all ranks after every step;
- rank 0 alone reads and writes the run directory (config, checkpoints, tickets, logs, summary) and
  prints progress; what it reads reaches the other ranks by broadcast (`from_main`), so other machines
  need the dataset but not the run directory;
- decisions are rank 0's and broadcast (`sync_from_main`): the Early-Bird detector draws its masks
  there, and every rank stops the search at the same epoch.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
from typing import Any, Callable, Iterator, NoReturn, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import UserError

T = TypeVar("T")

LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def launched() -> bool:
    """Whether torchrun (or another launcher that sets WORLD_SIZE, RANK and LOCAL_RANK) started this process."""
    return all(name in os.environ for name in LAUNCHER_VARIABLES)


def is_distributed() -> bool:
    """Whether this process is in a process group (after `setup()` under torchrun)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes training together; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's place among them, 0 to world_size() - 1; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    """This process's place on its own machine (torchrun's LOCAL_RANK): the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def is_main() -> bool:
    """Whether this is rank 0, the process that writes the run directory and prints."""
    return rank() == 0


def setup() -> None:
    """Join the process group torchrun started this process in; nothing when torchrun did not start it,
    or when the group exists already."""
    if not launched() or is_distributed():
        return
    on_gpu = torch.cuda.is_available() and dist.is_nccl_available()
    if on_gpu and int(os.environ["LOCAL_RANK"]) < torch.cuda.device_count():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # gradients and metrics on CUDA go through NCCL; CPU tensors, objects and barriers through gloo
    dist.init_process_group("cpu:gloo,cuda:nccl" if on_gpu else "gloo")


def teardown() -> None:
    """Leave the process group, if this process is in one."""
    if is_distributed():
        dist.destroy_process_group()


def end_process(code: int) -> NoReturn:
    """End this process with exit status `code` at once, skipping the interpreter's finalization; for a
    process that was in a gloo process group, after `teardown()`.

    A gloo worker thread can still be releasing the tensors of the last collective when the interpreter
    finalizes: the release needs the GIL, a finalizing interpreter no longer grants it, and the process
    aborts ("terminate called without an active exception", exit -6) after a finished run, so torchrun
    reports a failure. Joining those threads first is not possible: DistributedDataParallel keeps the
    process group alive past destroy_process_group. Everything ebtrain writes is closed by the time
    a run returns; stdout and stderr are flushed here.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier() -> None:
    """Wait until every rank has arrived here."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` (any picklable object) on every rank; what the other ranks pass is ignored."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def from_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` computed on rank 0 only, its result handed to every rank: how every rank
    reads what rank 0 wrote. A UserError raised on rank 0 is raised on every rank, so all stop."""
    if not is_distributed():
        return fn(*args, **kwargs)
    outcome = None
    if is_main():
        try:
            outcome = (True, fn(*args, **kwargs))
        except UserError as e:
            outcome = (False, str(e))
    ok, value = broadcast_object(outcome)
    if not ok:
        raise UserError(value)
    return value


def sync_from_main(obj: Any) -> None:
    """Make `obj` (anything with `state_dict` and `load_state_dict`) on every rank a copy of rank 0's."""
    if is_distributed():
        state = broadcast_object(obj.state_dict() if is_main() else None)
        if not is_main():
            obj.load_state_dict(state)


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block before the other ranks do, e.g. to build a cache that they then read."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def data_parallel(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """`model` wrapped in DistributedDataParallel; `model` itself without a process group.

    DDP averages the gradients over the ranks during backward, so they are final when backward returns
    (a hook that edits gradients after backward edits the averaged ones, alike on every rank), and it
    broadcasts rank 0's BatchNorm running statistics at every forward that follows a training step.
    `sync_bn` (CUDA only) normalizes with the statistics of the whole global batch instead of each
    rank's share: the wrapper then runs a twin of `model` with SyncBatchNorm layers that share every
    parameter, buffer and hook with `model`, which itself keeps its BatchNorm2d layers for the detector,
    pruning and checkpoints. Train and evaluate through the returned module (its train()/eval() mode
    is its own).
    """
    if sync_bn and device.type != "cuda":
        raise UserError("--sync-bn synchronizes BatchNorm statistics across GPUs: it needs --device cuda")
    if not is_distributed():
        return model
    step_model = _with_sync_batchnorm(model) if sync_bn else model
    return nn.parallel.DistributedDataParallel(step_model, device_ids=[device.index] if device.type == "cuda" else None)


def _with_sync_batchnorm(module: nn.Module) -> nn.Module:
    """A twin of the module tree with nn.SyncBatchNorm for every nn.BatchNorm2d, sharing all tensors.

    Each module is copied shallowly (its parameter, buffer and hook dictionaries are the original's),
    and SyncBatchNorm.convert_sync_batchnorm reuses the BatchNorm's weight, bias and running statistics.
    """
    if isinstance(module, nn.BatchNorm2d):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    twin = copy.copy(module)
    twin._modules = {name: _with_sync_batchnorm(child) for name, child in module._modules.items()}
    return twin
