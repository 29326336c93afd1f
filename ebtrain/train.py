"""One Trainer for every phase: dense baseline, Early-Bird search, ticket retraining.

The loop is short on purpose; features (the L1 penalty, the Early-Bird detector) attach as hooks.
Epochs are counted globally: a retrain that starts at EB epoch 25 of a 160-epoch schedule trains epochs
26..160 and its learning rate follows the same milestones as the dense run.
"""
from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint
from .config import TrainConfig, resolve_milestones
from .data import BatchLoader, DataBundle
from .errors import UserError
from .monitor import Monitor


class Hook:
    """A feature attached to training. Override what you need; state goes into every checkpoint."""

    def after_backward(self, trainer: "Trainer") -> None:
        """Called after loss.backward(), before the optimizer step (e.g. to edit gradients)."""

    def after_step(self, trainer: "Trainer") -> None:
        """Called after optimizer.step() (e.g. to round the updated weights and optimizer state)."""

    def after_epoch(self, trainer: "Trainer", epoch: int, metrics: dict) -> None:
        """Called after epoch `epoch` (1-based, global) is trained and evaluated.
        Set `trainer.stop = True` to end training after this epoch."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device '{name}' is not a device: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' was asked for but CUDA is not available: use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that model initialization is reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def learning_rate(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate during global epoch index `epoch` (0-based) of the multi-step schedule."""
    passed = sum(epoch >= m for m in resolve_milestones(cfg.milestones, cfg.epochs))
    return cfg.lr * cfg.gamma ** passed


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """SGD with momentum (fused on CUDA) or Adam, with weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           fused=device.type == "cuda")


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader) -> tuple[float, float]:
    """Mean loss and accuracy over the whole of `loader`'s data (exact, no dropped batch)."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for x, y in loader:
        with _autocast(x.device):
            out = model(_layout(x))
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
    n = loader.num_samples
    return loss_sum.item() / n, correct.item() / n


def _autocast(device: torch.device):
    # bf16 keeps fp32's range, so no loss scaling is needed; CPU stays in fp32 for exactness.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _layout(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda and x.dim() == 4 else x


class Trainer:
    """Trains `model` on `data` over global epochs [start_epoch, end_epoch) of the schedule in `cfg`.

    Writes, when `out_dir` is given: `checkpoint.pt` after every epoch (atomically), `metrics.jsonl`
    (one JSON object per epoch) and TensorBoard events. `resume()` continues from the checkpoint with
    the same epoch, optimizer state, schedule, hook state and data order.
    """

    def __init__(self, model: nn.Module, data: DataBundle, cfg: TrainConfig, *, device: torch.device,
                 out_dir: Path | None = None, hooks: Iterable[Hook] = (), start_epoch: int = 0,
                 end_epoch: int | None = None, progress: bool = False, tensorboard: bool = True,
                 name: str = "train"):
        self.cfg = cfg
        self.device = device
        self.model = model.to(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.step_model = torch.compile(self.model) if cfg.compile else self.model
        self.hooks = list(hooks)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.start_epoch = start_epoch
        self.end_epoch = cfg.epochs if end_epoch is None else end_epoch
        self.epoch = start_epoch  # next epoch index to train (0-based), = epochs completed
        self.progress = progress
        self.name = name
        self.optimizer = make_optimizer(self.model, cfg, device)
        self.history: list[dict] = []
        self.steps = 0
        self.seconds = 0.0
        self.stop = False
        norm = dict(mean=data.mean, std=data.std, device=device)
        self.train_loader = BatchLoader(data.train, cfg.batch_size, shuffle=True, augment=data.augment,
                                        seed=cfg.seed, **norm)
        self.test_loader = BatchLoader(data.test, cfg.eval_batch_size, **norm)
        self.val_loader = BatchLoader(data.val, cfg.eval_batch_size, **norm) if data.val is not None else None
        self.monitor = Monitor(self.out_dir if tensorboard else None)

    # ---- checkpointing -------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / "checkpoint.pt" if self.out_dir else None

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "epoch": self.epoch, "steps": self.steps, "seconds": self.seconds,
                "history": self.history, "hooks": [h.state_dict() for h in self.hooks],
                "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.steps, self.seconds = state["epoch"], state["steps"], state["seconds"]
        self.history = state["history"]
        for hook, hook_state in zip(self.hooks, state["hooks"]):
            hook.load_state_dict(hook_state)
        torch.set_rng_state(state["torch_rng"])

    def resume(self) -> bool:
        """Load `checkpoint.pt` from out_dir if there is one; returns whether it did."""
        state = checkpoint.load_checkpoint(self.checkpoint_path) if self.out_dir else None
        if state is None:
            return False
        self.load_state_dict(state)
        self.monitor.purge_from(self.epoch)
        return True

    def _save(self) -> None:
        if self.out_dir is None:
            return
        checkpoint.save_checkpoint(self.state_dict(), self.checkpoint_path)
        # metrics.jsonl is rewritten from the checkpointed history so the two never disagree
        checkpoint.atomic_write_text("".join(json.dumps(m) + "\n" for m in self.history),
                                     self.out_dir / "metrics.jsonl")

    # ---- training ------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train until end_epoch or until a hook sets `stop`; returns `result()`."""
        while self.epoch < self.end_epoch and not self.stop:
            self._train_epoch()
        self.monitor.flush()
        return self.result()

    def _train_epoch(self) -> None:
        e = self.epoch
        lr = learning_rate(self.cfg, e)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        self.model.train()
        self.train_loader.set_epoch(e)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        bar = tqdm(self.train_loader, desc=f"{self.name} epoch {e + 1}/{self.end_epoch}",
                   disable=not self.progress, leave=False, file=sys.stderr)
        for x, y in bar:
            with _autocast(self.device):
                out = self.step_model(_layout(x))
                loss = F.cross_entropy(out.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for hook in self.hooks:
                hook.after_backward(self)
            self.optimizer.step()
            for hook in self.hooks:
                hook.after_step(self)
            # accumulate on the device: no host synchronization inside the step
            loss_sum += loss.detach() * y.numel()
            correct += (out.argmax(1) == y).sum()
            self.steps += 1
        n = self.train_loader.num_samples
        metrics = {"epoch": e + 1, "lr": lr, "train_loss": loss_sum.item() / n, "train_acc": correct.item() / n}
        metrics["test_loss"], metrics["test_acc"] = evaluate(self.step_model, self.test_loader)
        if self.val_loader is not None:
            metrics["val_loss"], metrics["val_acc"] = evaluate(self.step_model, self.val_loader)
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
        if not np.isfinite(metrics["train_loss"]):
            raise UserError(f"{self.name}: the training loss became {metrics['train_loss']} in epoch {e + 1}; "
                            "try a smaller --lr")
        self._save()
        print(f"{self.name} epoch {e + 1}/{self.end_epoch}: loss {metrics['train_loss']:.3f} "
              f"train {100 * metrics['train_acc']:.1f}% test {100 * metrics['test_acc']:.2f}% "
              f"lr {lr:.4g} ({seconds:.1f}s)", file=sys.stderr, flush=True)

    def result(self) -> dict:
        """Final and best test accuracy, epochs trained, steps and seconds (JSON-able)."""
        accs = [m["test_acc"] for m in self.history]
        return {"epochs_trained": len(self.history), "first_epoch": self.start_epoch + 1,
                "last_epoch": self.epoch, "steps": self.steps, "seconds": self.seconds,
                "final_test_acc": accs[-1] if accs else None, "best_test_acc": max(accs) if accs else None}
