"""One Trainer for every phase: dense baseline, Early-Bird search, ticket retraining.

The loop is short on purpose; features (the L1 penalty, the Early-Bird detector) attach as hooks.
Epochs are counted globally: a retrain that starts at EB epoch 25 of a 160-epoch schedule trains epochs
26..160 and its learning rate follows the same milestones as the dense run.
Under torchrun the same loop runs data-parallel (see distributed.py): each rank trains on its share of
every global batch, metrics are summed over the ranks, and only rank 0 writes files and prints.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint, distributed, rundir
from .config import Config, TrainConfig, compile_step, resolve_milestones
from .data import BatchLoader, DataBundle
from .stream import make_loader
from .errors import UserError
from .models import build_model
from .monitor import Monitor


class Hook:
    """A feature attached to training. Override what you need; state goes into every checkpoint."""

    def after_backward(self, trainer: "Trainer") -> None:
        """Called after loss.backward(), before the optimizer step (e.g. to edit gradients)."""

    def after_step(self, trainer: "Trainer") -> None:
        """Called after optimizer.step() (e.g. to round the updated weights and optimizer state). With a
        compiled step this runs inside the compiled update: tensor work only, no Python state that
        changes from step to step (each new value would compile the update again)."""

    def step_end(self, trainer: "Trainer") -> None:
        """Called after every training step, outside the compiled step: host-side work such as counting or
        timing steps (`trainer.steps` is the number done). Runs every step, so keep it cheap."""

    def after_epoch(self, trainer: "Trainer", epoch: int, metrics: dict) -> None:
        """Called after epoch `epoch` (1-based, global) is trained and evaluated.
        Set `trainer.stop = True` to end training after this epoch."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; otherwise the named device, checked.
    Under torchrun, cuda is the GPU of this process's LOCAL_RANK."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"device '{name}' is not a device: use cpu, cuda, cuda:N or auto") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device '{name}' was asked for but CUDA is not available: use --device cpu")
    if device.type == "cuda" and distributed.is_distributed():
        return _local_gpu(name, device)
    return device


def _local_gpu(name: str, device: torch.device) -> torch.device:
    if device.index is not None:
        raise UserError(f"device '{name}': under torchrun every process uses the GPU of its LOCAL_RANK; "
                        "use --device cuda")
    gpus, local = torch.cuda.device_count(), distributed.local_rank()
    if local >= gpus:
        raise UserError(f"process with LOCAL_RANK {local} has no GPU of its own: this machine has {gpus}; "
                        f"start at most {gpus} processes per machine (--nproc_per_node)")
    return torch.device("cuda", local)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that model initialization is reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def learning_rate(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate during global epoch index `epoch` (0-based) of the multi-step schedule."""
    passed = sum(epoch >= m for m in resolve_milestones(cfg.milestones, cfg.epochs))
    return cfg.lr * cfg.gamma ** passed


def warmup_factor(warmup_iter: int, step: int) -> float:
    """The warmup's factor on the scheduled learning rate at global step `step` (0-based): (step + 1) / warmup_iter
    over the first `warmup_iter` steps, so the rate rises linearly from lr / warmup_iter to lr, then 1; always 1
    with warmup_iter 0. The Trainer counts steps from the start of the schedule (epoch * steps per epoch + the
    step within the epoch), the lottery's trainings from the start of each training."""
    return min(1.0, (step + 1) / warmup_iter) if warmup_iter > 0 else 1.0


def make_optimizer(params: list[torch.Tensor], cfg: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    """SGD with momentum or Adam, with weight decay, over `params`. `fused`: one elementwise kernel per
    step (the Trainer asks for it on CUDA; the lottery's stacked networks everywhere, where each stacked
    tensor then steps as its networks' separate optimizers would)."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)


def new_model(cfg: Config, data: DataBundle, seed: int | None = None) -> nn.Module:
    """The network `cfg.model` asks for, shaped for `data`; with `seed`, its initial weights are that
    seed's (everything is seeded first)."""
    if seed is not None:
        seed_everything(seed)
    return build_model(cfg.model.arch, num_classes=data.num_classes, in_channels=data.in_channels,
                       width=cfg.model.width, image_size=data.image_size)


@torch.no_grad()
def evaluation_sums(forward: Callable[[torch.Tensor], torch.Tensor], loader: BatchLoader
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy loss and number of correct predictions over the whole of `loader`'s data.

    `forward` maps a batch x [B, ...] to logits [..., B, classes]; leading axes (one per network when
    several networks see the same batch) are kept in the sums, the batch axis is summed over."""
    loss_sum = torch.zeros((), device=loader.device)
    correct = torch.zeros((), device=loader.device, dtype=torch.long)
    for x, y in loader:
        out = forward(x).float()
        labels = y.expand(out.shape[:-1])
        loss_sum = loss_sum + F.cross_entropy(out.movedim(-1, 1), labels, reduction="none").sum(-1)
        correct = correct + (out.argmax(-1) == labels).sum(-1)
    return loss_sum, correct


def evaluate(model: nn.Module, loader: BatchLoader) -> tuple[float, float]:
    """Mean loss and accuracy over the whole of `loader`'s data (exact, no dropped batch); under torchrun
    each rank evaluates its share of the data and the sums are added up over the ranks."""
    model.eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        with _autocast(x.device):
            return model(_layout(x))

    loss_sum, correct = evaluation_sums(forward, loader)
    n = loader.num_samples
    return distributed.all_reduce_sum(loss_sum).item() / n, distributed.all_reduce_sum(correct).item() / n


def _autocast(device: torch.device):
    # bf16 keeps fp32's range, so no loss scaling is needed; CPU stays in fp32 for exactness.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _layout(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda and x.dim() == 4 else x


def configure_cuda(deterministic: bool) -> None:
    """The numerical choices of CUDA training, set explicitly rather than inherited: cuDNN picks its
    algorithms by heuristics (no benchmarking, whose choice can differ from run to run); with
    `deterministic` cuDNN and cuBLAS use only deterministic algorithms, so a run repeats bit for bit.
    TF32 stays at PyTorch's defaults (on for cuDNN convolutions, off for matrix products); under bf16
    autocast the convolutions and linear layers run in bf16 anyway."""
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        # cuBLAS is deterministic only with a fixed workspace; it must be set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


class _FirstCallTimer:
    """Seconds spent in the first call of each part of the step at each batch shape: with a compiled step
    the calls that compile (and on CUDA capture a graph), which the phase's seconds include. The device
    is synchronized around those calls only."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seen: set[tuple] = set()
        self.seconds = 0.0

    def call(self, shape: tuple, fn, *args):
        """fn(*args), timed if it is the first call of `fn` on a batch of this shape."""
        key = (getattr(fn, "__name__", id(fn)), shape)
        if key in self.seen:
            return fn(*args)
        self.seen.add(key)
        _synchronize(self.device)
        started = time.perf_counter()
        out = fn(*args)
        _synchronize(self.device)
        self.seconds += time.perf_counter() - started
        return out


def _optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """`optimizer.step()` without torch.optim's wrappers, for the compiled update: they switch grad mode with
    a graph break on either side (so a step compiled alone is an inference graph) and call the step's
    hooks, which ebtrain does not use. The caller runs it under `torch.no_grad()`, so the hooks before the
    step, the step and the hooks after it compile into one graph, one replay per step on CUDA."""
    step = type(optimizer).step
    while hasattr(step, "__wrapped__"):
        step = step.__wrapped__
    step(optimizer)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """Trains `model` on `data` over global epochs [start_epoch, end_epoch) of the schedule in `cfg`.

    Writes, when `out_dir` is given: `checkpoint.pt` after every epoch (atomically), `metrics.jsonl`
    (one JSON object per epoch) and TensorBoard events. `resume()` continues from the checkpoint with
    the same epoch, optimizer state, schedule, hook state and data order.

    Under torchrun `model` trains through DistributedDataParallel (`step_model`; `model` stays the
    plain network, the same on every rank after every step), `cfg.batch_size` is the global batch,
    each rank takes its equal share of it, and only rank 0 writes and prints; `resume()` loads rank 0's
    checkpoint on every rank.
    """

    def __init__(self, model: nn.Module, data: DataBundle, cfg: TrainConfig, *, device: torch.device,
                 out_dir: Path | None = None, hooks: Iterable[Hook] = (), start_epoch: int = 0,
                 end_epoch: int | None = None, progress: bool = False, tensorboard: bool = True,
                 name: str = "train"):
        self.cfg = cfg
        self.device = device
        self.model = model.to(device)
        if device.type == "cuda":
            configure_cuda(cfg.deterministic)
            self.model = self.model.to(memory_format=torch.channels_last)
        self.step_model = distributed.data_parallel(self.model, device, sync_bn=cfg.sync_bn)
        self.compiled = compile_step(cfg, device.type)
        self._forward, self._update, self.eval_model = self._forward_loss, self._apply_update, self.step_model
        if self.compiled:
            # reduce-overhead: CUDA graphs, captured at the first call of each batch shape and replayed
            mode = "reduce-overhead" if device.type == "cuda" else None
            self._forward = torch.compile(self._forward_loss, mode=mode, dynamic=False)
            self._update = torch.compile(self._apply_update, mode=mode, dynamic=False)
            self.eval_model = torch.compile(self.step_model, mode=mode, dynamic=False)
        self._first_calls = _FirstCallTimer(device)
        self._compile_seconds_before = 0.0
        self.hooks = list(hooks)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.start_epoch = start_epoch
        self.end_epoch = cfg.epochs if end_epoch is None else end_epoch
        self.epoch = start_epoch  # next epoch index to train (0-based), = epochs completed
        self.progress = progress and distributed.is_main()
        self.name = name
        self.optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad], cfg,
                                        fused=device.type == "cuda")
        self._lr = torch.tensor(cfg.lr, dtype=torch.float32, device=device) if self.compiled else None  # see _set_lr
        self.history: list[dict] = []
        self.steps = 0
        self.seconds = 0.0
        self.stop = False
        placement = dict(device=device, rank=distributed.rank(), world_size=distributed.world_size())
        self.train_loader = make_loader(data, "train", cfg.batch_size, train=True, seed=cfg.seed, **placement)
        self.test_loader = make_loader(data, "test", cfg.eval_batch_size, **placement)
        self.val_loader = make_loader(data, "val", cfg.eval_batch_size, **placement) if data.val is not None else None
        self.monitor = Monitor(self.out_dir if tensorboard and distributed.is_main() else None)

    @property
    def compile_seconds(self) -> float:
        """Seconds of the phase's first calls at each batch shape, in this process and those it resumed."""
        return self._compile_seconds_before + self._first_calls.seconds

    # ---- checkpointing -------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / rundir.CHECKPOINT_FILE if self.out_dir else None

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "epoch": self.epoch, "steps": self.steps, "seconds": self.seconds,
                "compile_seconds": self.compile_seconds, "history": self.history, "hooks": [h.state_dict() for h in self.hooks],
                "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.steps, self.seconds = state["epoch"], state["steps"], state["seconds"]
        self._compile_seconds_before = state.get("compile_seconds", 0.0)  # what earlier processes spent
        self.history = state["history"]
        for hook, hook_state in zip(self.hooks, state["hooks"]):
            hook.load_state_dict(hook_state)
        torch.set_rng_state(state["torch_rng"])

    def resume(self) -> bool:
        """Load `checkpoint.pt` from out_dir if there is one; returns whether it did."""
        state = distributed.from_main(checkpoint.load_checkpoint, self.checkpoint_path) if self.out_dir else None
        if state is None:
            return False
        self.load_state_dict(state)
        self.monitor.purge_from(self.epoch)
        return True

    def _save(self) -> None:
        if self.out_dir is None or not distributed.is_main():
            return
        checkpoint.save_checkpoint(self.state_dict(), self.checkpoint_path)
        # metrics.jsonl is rewritten from the checkpointed history so the two never disagree
        checkpoint.atomic_write_text("".join(json.dumps(m) + "\n" for m in self.history),
                                     self.out_dir / rundir.METRICS_FILE)

    # ---- training ------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train until end_epoch or until a hook sets `stop`; returns `result()`.

        Raises UserError when the loss stops being finite or the GPU runs out of memory, saying what to
        change; the checkpoint of the last finished epoch stays as it was."""
        try:
            while self.epoch < self.end_epoch and not self.stop:
                self._train_epoch()
        except torch.OutOfMemoryError:
            raise UserError(f"{self.name}: out of {self.device} memory in epoch {self.epoch + 1}: start again with "
                            f"a smaller --batch-size (now {self.cfg.batch_size}), or a smaller --eval-batch-size "
                            f"(now {self.cfg.eval_batch_size}) if it ran out while evaluating") from None
        self.monitor.flush()
        return self.result()

    def _set_lr(self, value: float) -> None:
        """Set every param group's learning rate: a float for the eager step; for the compiled one the tensor `_lr`,
        filled in place, so a rate that changes every step (warmup) or at a milestone does not compile the step
        again. Whatever a checkpoint's param groups held (older ones: floats) is replaced."""
        if self._lr is not None:
            self._lr.fill_(value)
        for group in self.optimizer.param_groups:
            group["lr"] = value if self._lr is None else self._lr

    def _train_epoch(self) -> None:
        e = self.epoch
        scheduled = learning_rate(self.cfg, e)
        first_step = e * len(self.train_loader)  # global steps before this epoch, for the warmup
        lr = None  # the rate set last; with warmup it changes every step, so the epoch reports its last step's
        started = time.perf_counter()
        self.step_model.train()
        self.train_loader.set_epoch(e)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        bar = tqdm(self.train_loader, desc=f"{self.name} epoch {e + 1}/{self.end_epoch}",
                   disable=not self.progress, leave=False, file=sys.stderr)
        first_bad_step = torch.zeros((), device=self.device, dtype=torch.long)  # 1-based; 0: every loss finite
        for step, (x, y) in enumerate(bar, 1):
            if self.compiled and self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are consumed
            rate = scheduled * warmup_factor(self.cfg.warmup_iter, first_step + step - 1)
            if rate != lr:
                self._set_lr(rate)
                lr = rate
            shape = tuple(x.shape)
            loss, step_correct = self._first_calls.call(shape, self._forward, x, y)
            # accumulate on the device: no host synchronization inside the step
            loss_sum += loss.detach() * y.numel()
            correct += step_correct
            first_bad_step = torch.where((first_bad_step == 0) & ~torch.isfinite(loss.detach()), step, first_bad_step)
            self.optimizer.zero_grad(set_to_none=True)
            self._first_calls.call(shape, loss.backward)
            with torch.no_grad():  # the update's graph is then an inference graph, updating in place
                self._first_calls.call(shape, self._update)
            self.steps += 1
            for hook in self.hooks:
                hook.step_end(self)
        n = self.train_loader.num_samples
        metrics = {"epoch": e + 1, "lr": lr, "train_loss": distributed.all_reduce_sum(loss_sum).item() / n,
                   "train_acc": distributed.all_reduce_sum(correct).item() / n}
        # checked before the hooks and the checkpoint see the weights: a diverged epoch is never saved
        self._stop_if_diverged("training", metrics["train_loss"], int(first_bad_step), lr)
        metrics["test_loss"], metrics["test_acc"] = self._evaluate(self.test_loader)
        self._stop_if_diverged("test", metrics["test_loss"], 0, lr)
        if self.val_loader is not None:
            metrics["val_loss"], metrics["val_acc"] = self._evaluate(self.val_loader)
        seconds = time.perf_counter() - started
        self.seconds += seconds
        metrics.update(seconds=seconds, steps=self.steps)
        self.epoch = e + 1
        self.history.append(metrics)
        self.monitor.scalars(e + 1, {"train/loss": metrics["train_loss"], "train/acc": metrics["train_acc"],
                                     "test/loss": metrics["test_loss"], "test/acc": metrics["test_acc"],
                                     "lr": lr, **({"val/loss": metrics["val_loss"], "val/acc": metrics["val_acc"]}
                                                  if "val_loss" in metrics else {})})
        for hook in self.hooks:
            hook.after_epoch(self, e + 1, metrics)
        self._save()
        if distributed.is_main():
            print(f"{self.name} epoch {e + 1}/{self.end_epoch}: loss {metrics['train_loss']:.3f} "
                  f"train {100 * metrics['train_acc']:.1f}% test {100 * metrics['test_acc']:.2f}% "
                  f"lr {lr:.4g} ({seconds:.1f}s)", file=sys.stderr, flush=True)

    def _evaluate(self, loader: BatchLoader) -> tuple[float, float]:
        """`evaluate` with the compiled model when the step is compiled (its first call timed)."""
        return self._first_calls.call(("eval", loader.batch_size), evaluate, self.eval_model, loader)

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's forward: (mean cross-entropy loss, number of correct predictions)."""
        with _autocast(self.device):
            out = self.step_model(_layout(x))
            loss = F.cross_entropy(out.float(), y)
        return loss, (out.argmax(1) == y).sum()

    def _apply_update(self) -> None:
        """The step after backward: the hooks that edit gradients, the optimizer, the hooks after it.
        Compiled, it is one graph: see `_optimizer_step`."""
        for hook in self.hooks:
            hook.after_backward(self)
        if self.compiled:
            _optimizer_step(self.optimizer)
        else:
            self.optimizer.step()
        for hook in self.hooks:
            hook.after_step(self)

    def _stop_if_diverged(self, which: str, loss: float, step: int, lr: float) -> None:
        """UserError if `loss` (the epoch's `which` loss) is not finite; `step`: the epoch's first step whose
        loss was not (1-based), 0 if unknown."""
        if math.isfinite(loss):
            return
        where = f"at step {step} of {len(self.train_loader)}" if step else "by its end"
        kept = (f"the checkpoint of epoch {self.epoch} is kept" if self.out_dir and self.checkpoint_path.exists()
                else "nothing was saved")
        raise UserError(f"{self.name}: the {which} loss became {loss} in epoch {self.epoch + 1}, {where}; {kept}. "
                        f"Start again with a smaller --lr (this epoch's is {lr:g}), or --precision fp32 for an "
                        "8-bit search")

    def result(self) -> dict:
        """Final and best test accuracy, epochs trained, steps and seconds (JSON-able); with a compiled
        step, `compile_seconds`: the part of `seconds` spent in the calls that compiled and captured."""
        accs = [m["test_acc"] for m in self.history]
        return {"epochs_trained": len(self.history), "first_epoch": self.start_epoch + 1,
                "last_epoch": self.epoch, "steps": self.steps, "seconds": self.seconds,
                "compiled": self.compiled, "compile_seconds": self.compile_seconds if self.compiled else None,
                "final_test_acc": accs[-1] if accs else None, "best_test_acc": max(accs) if accs else None}
