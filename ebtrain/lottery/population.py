"""K networks of one architecture trained in lockstep, each with its own mask, initialization, data order
and early-stopping record: the engine of the lottery-ticket experiments (experiment.py).

    records, finals, _ = train_members(make_model, members, data, cfg.train, device, iterations, eval_every)

Where the architecture allows (`can_batch`: LeNet-300-100, Conv-2/4/6) the K networks are one batched
model: parameters stacked on a leading model axis, one forward pass with batched matrix products
(linear layers) and vmap (conv layers), one fused optimizer step on the stacked tensors (Adam and SGD
are elementwise, so this is the same as K optimizers). Otherwise each trains alone (the one-model
path, for every architecture). Both give the same results to float tolerance. Masks hold through
training: a pruned weight starts at zero and its gradient is zeroed before every step, so it gets no
update, momentum or weight decay. On the CPU a sparse enough input layer is held block-sparse
(sparse.py).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from ..config import TrainConfig
from ..data import BatchLoader, DataBundle
from ..errors import UserError
from ..train import evaluation_sums, learning_rate, make_optimizer, warmup_factor
from .masks import Masks, apply_masks
from .sparse import SPARSE_BELOW, BlockSparse, block_sparse_linear


@dataclass
class Member:
    """One network to train: its seed (data order), arm (a label), starting weights and masks."""

    seed: int
    arm: str
    state: dict[str, torch.Tensor]
    masks: Masks  # by parameter name; parameters without one are not pruned


def can_batch(model: nn.Module) -> bool:
    """Whether networks of this architecture can train as one batched model: a `layers` Sequential of
    linear (with bias), conv and parameter-free layers, and no buffers (BatchNorm statistics are per
    network)."""
    def batchable(layer: nn.Module) -> bool:
        if isinstance(layer, nn.Linear):
            return layer.bias is not None
        return isinstance(layer, nn.Conv2d) or next(layer.parameters(), None) is None

    layers = getattr(model, "layers", None)
    return (isinstance(layers, nn.Sequential) and next(model.buffers(), None) is None
            and all(batchable(layer) for layer in layers))


class _StackedLinear(torch.autograd.Function):
    """K linear layers at once: x [K, B, in], weight [K, out, in], bias [K, out] -> [K, B, out].

    vmap over F.linear computes the weight gradient as x^T g and transposes it, which costs a copy of
    every gradient per step on the CPU; g^T x is the gradient in the weight's own layout.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        return grad_x, torch.bmm(grad.transpose(1, 2), x), grad.sum(1)


def _stacked_layer(layer: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                   pattern: BlockSparse | None = None) -> torch.Tensor:
    """One layer of K networks on x [K, B, ...]; `pattern` when its weight is held block-sparse."""
    # a snapshot passed as params holds the weight stacked [K, out, in]: that takes the dense path
    if pattern is not None and params["weight"].dim() == 1:
        return block_sparse_linear(x, params["weight"], params["bias"], pattern)
    if isinstance(layer, nn.Linear):
        return _StackedLinear.apply(x, params["weight"], params["bias"])
    if params:  # conv: vmap turns K convolutions into one grouped convolution
        return vmap(lambda p, xk: functional_call(layer, p, (xk,)))(params, x)
    return layer(x.flatten(0, 1)).unflatten(0, x.shape[:2])  # ReLU, pooling, flatten: K*B samples


class Population:
    """K networks of one architecture trained in lockstep, their parameters stacked on a leading axis.

    K > 1 (architectures `can_batch` accepts): one forward pass through the layers for all K networks
    with batched matrix products. K = 1: `functional_call` on `model` itself, whose buffers (BatchNorm
    statistics) it updates: the one-model path, for every architecture.

    With K > 1, an input layer that is linear and keeps less than `sparse_below` of its weights (over
    all K) is held block-sparse: `params[name]` is then the vector of its kept weights (`BlockSparse`),
    and `snapshot` gives it back as the stacked weight.
    """

    def __init__(self, model: nn.Module, members: list[Member], device: torch.device, sparse_below: float = 0.0):
        if len(members) > 1 and not can_batch(model):
            raise ValueError(f"{type(model).__name__} networks train one at a time (see can_batch)")
        self.model = model.to(device)
        self.size = len(members)
        self.params = {name: torch.stack([m.state[name] for m in members]).to(device).requires_grad_()
                       for name, _ in model.named_parameters()}
        if self.size == 1:
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    buffer.copy_(members[0].state[name])
        self.masks = {name: torch.stack([m.masks[name] for m in members]).to(device) for name in members[0].masks}
        apply_masks(self.params, self.masks)
        self.sparse: dict[str, BlockSparse] = {}
        name = _input_linear_weight(model) if self.size > 1 else None
        if name in self.masks and self.masks[name].float().mean() < sparse_below:
            self.sparse[name] = BlockSparse(self.masks[name])
            self.params[name] = self.sparse[name].values(self.params[name].detach()).requires_grad_()
        self._masked = [n for n in self.masks if n not in self.sparse]  # a sparse weight holds no pruned entry
        # float copies: multiplying a gradient by a bool mask would convert the mask on every step
        self._gradient_masks = [self.masks[n].to(self.params[n].dtype) for n in self._masked]
        self._layers = [(layer, {local: f"layers.{i}.{local}" for local, _ in layer.named_parameters()})
                        for i, layer in enumerate(model.layers)] if self.size > 1 else []

    def __call__(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None,
                 shared: bool = False) -> torch.Tensor:
        """Logits [K, B, classes] of inputs x [K, B, ...] (one batch per network), or of one batch
        x [B, ...] seen by all with `shared`."""
        params = self.params if params is None else params
        if self.size == 1:
            # view, not select: its backward is free, select's would copy the whole gradient
            one = {name: p.view(p.shape[1:]) for name, p in params.items()}
            return functional_call(self.model, one, (x if shared else x[0],)).unsqueeze(0)
        if shared:
            x = x.expand(self.size, *x.shape)
        for layer, names in self._layers:
            x = _stacked_layer(layer, {local: params[name] for local, name in names.items()}, x,
                               self.sparse.get(names.get("weight", "")))
        return x

    def mask_gradients(self) -> None:
        """Zero the gradients of pruned weights, so the optimizer leaves them (and their state) at zero."""
        torch._foreach_mul_([self.params[n].grad for n in self._masked], self._gradient_masks)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the parameters, every weight stacked [K, ...] (and, for one network, its buffers)."""
        state = {name: self.sparse[name].stacked(p.detach()) if name in self.sparse else p.detach().clone()
                 for name, p in self.params.items()}
        if self.size == 1:
            state.update({name: b.detach().clone().unsqueeze(0) for name, b in self.model.named_buffers()})
        return state

    def load_buffers(self, stacked: dict[str, torch.Tensor]) -> None:
        """Put a snapshot's buffers back into the model (one network only; no-op otherwise)."""
        if self.size == 1:
            with torch.no_grad():
                for name, buffer in self.model.named_buffers():
                    buffer.copy_(stacked[name][0])


def _input_linear_weight(model: nn.Module) -> str | None:
    """The weight's name of the first parametrized layer when it is linear: its input (the data) needs
    no gradient, which the block-sparse layer relies on."""
    for i, layer in enumerate(model.layers):
        if next(layer.parameters(), None) is not None:
            return f"layers.{i}.weight" if isinstance(layer, nn.Linear) else None
    return None


def train_step(pop: Population, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One optimizer step of every network on its own batch: x [K, B, ...], y [K, B]."""
    out = pop(x)
    # each network's own mean loss; the gradient of their sum w.r.t. network k's weights is k's own
    loss = F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)
    optimizer.zero_grad(set_to_none=True)
    loss.sum().backward()
    pop.mask_gradients()
    optimizer.step()


def _endless(loader: BatchLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def _evaluate(pop: Population, loader: BatchLoader, params: dict[str, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss and accuracy [K] of every network over the whole of `loader`'s data."""
    pop.model.eval()
    loss, correct = evaluation_sums(lambda x: pop(x, params, shared=True), loader)
    pop.model.train()
    return loss / loader.num_samples, correct / loader.num_samples


def train_population(pop: Population, members: list[Member], data: DataBundle, cfg: TrainConfig,
                     iterations: int, eval_every: int, snapshot_at: int = 0,
                     name: str = "train") -> tuple[list[dict], dict, dict | None]:
    """Train every network of `pop` for `iterations` steps, each on its own data order.

    Every `eval_every` steps (and after the last) the validation loss of each network is measured; the
    step with the lowest is its early-stopping iteration, and its weights then are kept to measure test
    accuracy at early stopping. Returns (one record per network, final snapshot, snapshot after step
    `snapshot_at` or None).
    """
    device = pop.params[next(iter(pop.params))].device
    norm = dict(mean=data.mean, std=data.std, device=device)
    loaders = {s: BatchLoader(data.train, cfg.batch_size, shuffle=True, augment=data.augment, seed=s, **norm)
               for s in dict.fromkeys(m.seed for m in members)}
    streams = {s: _endless(loader) for s, loader in loaders.items()}
    # one evaluation batch holds eval_batch_size images over all K networks, so memory stays bounded
    eval_batch = max(1, cfg.eval_batch_size // pop.size)
    val = BatchLoader(data.val, eval_batch, **norm)
    optimizer = make_optimizer(list(pop.params.values()), cfg, fused=True)
    # milestones and the warmup count iterations (milestones below 1: fractions of them)
    schedule = dataclasses.replace(cfg, epochs=iterations)
    best_loss = torch.full((pop.size,), math.inf, device=device)
    best_iter = torch.zeros(pop.size, dtype=torch.long)
    best = pop.snapshot()
    curve: list[tuple[int, list[float], list[float]]] = []
    rewind = None
    started = time.perf_counter()
    pop.model.train()
    for it in range(1, iterations + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(schedule, it - 1) * warmup_factor(cfg.warmup_iter, it - 1)
        batches = {s: next(stream) for s, stream in streams.items()}
        x = torch.stack([batches[m.seed][0] for m in members])
        y = torch.stack([batches[m.seed][1] for m in members])
        train_step(pop, optimizer, x, y)
        if it == snapshot_at:
            rewind = pop.snapshot()
        if it % eval_every == 0 or it == iterations:
            val_loss, val_acc = _evaluate(pop, val)
            if not torch.isfinite(val_loss).all():
                raise UserError(f"the validation loss became {val_loss.tolist()} at iteration {it}; try a smaller --lr")
            better = val_loss < best_loss
            if better.any():
                best_loss = torch.where(better, val_loss, best_loss)
                best_iter[better.cpu()] = it
                now = pop.snapshot()
                for key, t in best.items():
                    t[better] = now[key][better]
            curve.append((it, val_loss.tolist(), val_acc.tolist()))
            if it * 10 // iterations != (it - eval_every) * 10 // iterations:  # about every 10%
                print(f"{name} iteration {it}/{iterations}: validation loss {val_loss.mean():.4f} (mean of "
                      f"{pop.size}), {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    final = pop.snapshot()
    records = _measure(pop, data, cfg, final, best, eval_batch)
    seconds = time.perf_counter() - started
    for k, (record, member) in enumerate(zip(records, members)):
        record.update(seed=member.seed, arm=member.arm, early_stop_iter=int(best_iter[k]),
                      val_loss_min=float(best_loss[k]), seconds=seconds / pop.size,
                      val_curve=[[it, losses[k], accs[k]] for it, losses, accs in curve])
    return records, final, rewind


def _measure(pop: Population, data: DataBundle, cfg: TrainConfig, final: dict, best: dict,
             eval_batch: int) -> list[dict]:
    """Test accuracy at the end and at early stopping, train accuracy at the end, per network."""
    device = pop.params[next(iter(pop.params))].device
    norm = dict(mean=data.mean, std=data.std, device=device)
    test = BatchLoader(data.test, eval_batch, **norm)
    train = BatchLoader(data.train, eval_batch, **norm)
    pop.load_buffers(best)
    test_loss_early, test_acc_early = _evaluate(pop, test, _params(pop, best))
    pop.load_buffers(final)
    test_loss_final, test_acc_final = _evaluate(pop, test, _params(pop, final))
    _, train_acc_final = _evaluate(pop, train, _params(pop, final))
    return [{"test_acc_early": float(test_acc_early[k]), "test_loss_early": float(test_loss_early[k]),
             "test_acc_final": float(test_acc_final[k]), "test_loss_final": float(test_loss_final[k]),
             "train_acc_final": float(train_acc_final[k])} for k in range(pop.size)]


def _params(pop: Population, snapshot: dict) -> dict:
    return {name: snapshot[name] for name in pop.params}


def train_members(make_model: Callable[[], nn.Module], members: list[Member], data: DataBundle,
                  cfg: TrainConfig, device: torch.device, iterations: int, eval_every: int, batched: bool = True,
                  snapshot_at: int = 0, name: str = "train") -> tuple[list[dict], list[dict], list[dict | None]]:
    """Train `members`: together as one batched model when `batched` and the architecture allows,
    else one at a time. Returns per member: its record, final state dict and the state dict after step
    `snapshot_at` (None when 0), all on the CPU."""
    model = make_model()
    groups = [members] if batched and can_batch(model) else [[m] for m in members]
    records, finals, rewinds = [], [], []
    for i, group in enumerate(groups):
        pop = Population(model if i == 0 else make_model(), group, device,
                         sparse_below=SPARSE_BELOW if device.type == "cpu" else 0.0)
        label = name if len(groups) == 1 else f"{name} ({group[0].arm}, seed {group[0].seed})"
        group_records, final, rewind = train_population(pop, group, data, cfg, iterations, eval_every,
                                                        snapshot_at, label)
        records += group_records
        finals += [_unstack(final, k) for k in range(len(group))]
        rewinds += [_unstack(rewind, k) if rewind is not None else None for k in range(len(group))]
    return records, finals, rewinds


def _unstack(stacked: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    return {name: t[k].detach().cpu().clone() for name, t in stacked.items()}
