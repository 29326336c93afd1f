"""What training costs, in FLOPs, and what EB-Train saved.

FLOPs are counted by PyTorch's own counter, `torch.utils.flop_counter.FlopCounterMode`, on a copy of
the model on the meta device (shapes only, so even a full-width VGG16 costs no arithmetic to count).
Its convention, and ours: 2 FLOPs per multiply-add of convolutions and matrix products, forward and
backward; elementwise and reduction work (BatchNorm, ReLU, pooling, bias adds, the loss, the optimizer
step) is not counted. The papers count the same way (the multiply-adds of conv and FC layers); the
uncounted work is a few operations per activation, against c_in x k^2 multiply-adds per activation of
the conv that made it.

Two conventions for a training step:
- measured: forward plus backward as the counter sees them. Backward costs two products per layer
  (the gradient of the input and of the weight), except that the first layer needs no input gradient,
  so measured training is a little less than 3x forward.
- paper: training = 3 x forward, as You et al. (2020) count it.

Run-level arithmetic (`baseline_cost`, `ticket_cost`, `run_cost`) works on the JSON-able phase costs
that `CostMeter.finish` writes into every phase's result, so `summary.json` and `ebtrain report`
compute savings the same way.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .channel_flops import LayerCost, forward_flops
from .monitor import Monitor
from .train import Hook, Trainer

CONVENTION = ("FLOPs by torch.utils.flop_counter.FlopCounterMode: 2 per multiply-add of conv and linear "
              "layers, BatchNorm/ReLU/pooling/loss/optimizer not counted; flops = measured forward + "
              "backward, flops_paper = 3 x forward (the paper's convention)")
FLOPS_AXIS_UNIT = 1e6  # test/acc_vs_flops is logged at step = cumulative training FLOPs in MFLOPs
FLOPS_AXIS_DIR = "flops"  # its own TensorBoard run inside the phase folder, see CostMeter


@dataclass(frozen=True)
class ModelCost:
    """A model's size and cost per image, measured at training batch size `batch_size`.

    step_flops: one training step (forward, loss, backward) on a batch of `batch_size` images;
    conv and matmul FLOPs are linear in the batch, so a step on b images costs b / batch_size of it,
    which is how a smaller last batch is counted (see `train_flops`).
    """

    params: int
    forward_flops_per_image: int
    step_flops: int
    batch_size: int
    layers: tuple[LayerCost, ...]

    @property
    def train_flops_per_image(self) -> float:
        return self.step_flops / self.batch_size

    def train_flops(self, images: int) -> int:
        """Measured FLOPs of training on `images` images (forward plus backward)."""
        return self.step_flops * images // self.batch_size

    def train_flops_paper(self, images: int) -> int:
        """FLOPs of training on `images` images in the paper's convention, 3 x forward."""
        return 3 * self.forward_flops_per_image * images

    def to_dict(self) -> dict:
        return {"params": self.params, "forward_flops_per_image": self.forward_flops_per_image,
                "train_flops_per_image": self.train_flops_per_image,
                "train_flops_per_image_paper": 3 * self.forward_flops_per_image,
                "step_flops": self.step_flops, "batch_size": self.batch_size,
                "layers": [asdict(layer) for layer in self.layers]}


def measure_cost(model: nn.Module, input_shape: tuple[int, ...], batch_size: int) -> ModelCost:
    """Parameters, forward FLOPs per image, training FLOPs per step and a per-layer table of `model`
    for inputs of `input_shape` (C, H, W) at training batch size `batch_size`. `model` is not touched:
    the counting runs on a copy on the meta device."""
    shadow = copy.deepcopy(model).to("meta")
    forward, layers = forward_flops(shadow, input_shape)
    return ModelCost(params=sum(p.numel() for p in model.parameters()), forward_flops_per_image=forward,
                     step_flops=_step_flops(shadow, input_shape, batch_size), batch_size=batch_size,
                     layers=layers)


def _step_flops(model: nn.Module, input_shape: tuple[int, ...], batch_size: int) -> int:
    """FLOPs of one training step (forward, cross-entropy, backward) on `batch_size` images."""
    model.train()  # at the real batch size, so BatchNorm in training mode sees what training sees
    x = torch.zeros(batch_size, *input_shape, device="meta")
    y = torch.zeros(batch_size, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return int(counter.get_total_flops())


def detector_ops(num_channels: int, num_ratios: int, steps: int) -> int:
    """An upper estimate of the Early-Bird detector's elementary operations over `steps` calls.

    Per call: |gamma| of the N channels, then per ratio one sort (N ceil(log2 N) comparisons) and a few
    linear passes (rank, protect one channel per layer, keep, distance to the previous mask; 8 N is
    generous). For VGG16 (N = 4,224) that is about 0.3 M operations an epoch against about 10^14
    training FLOPs an epoch on CIFAR-10: the detector is free. The mask-distance figures are not counted.
    """
    n = num_channels
    per_ratio = n * math.ceil(math.log2(max(n, 2))) + 8 * n
    return steps * (n + num_ratios * per_ratio)


def flops_axis_step(flops: float) -> int:
    """The TensorBoard step of `test/acc_vs_flops`: cumulative training FLOPs in MFLOPs."""
    return int(round(flops / FLOPS_AXIS_UNIT))


class CostMeter(Hook):
    """Adds up a phase's training FLOPs, epoch by epoch: images seen x training FLOPs per image.

    `start_flops` is what was spent before this phase (a retrain starts at the search's total), so
    the curves of every phase share one axis. After each epoch it writes `cumulative_flops` into the
    epoch's metrics, the scalar `cost/cumulative_flops` (step: epoch) to the phase's TensorBoard run,
    and `test/acc_vs_flops` (step: cumulative MFLOPs) to a TensorBoard run of its own, `<phase>/flops`:
    on resume a run's events past the checkpoint's step are purged, and that step is an epoch in
    the phase's run but MFLOPs here. Call `finish` after training for the phase's cost.
    """

    def __init__(self, cost: ModelCost, start_flops: float = 0):
        self.cost = cost
        self.start_flops = start_flops
        self.images = 0
        self._monitor: Monitor | None = None
        self._resumed = False

    @property
    def flops(self) -> int:
        return self.cost.train_flops(self.images)

    def _count(self, trainer: Trainer) -> None:
        # every epoch sees the whole training set, so images follow from the epochs the phase trained
        self.images = (trainer.epoch - trainer.start_epoch) * trainer.train_loader.num_samples

    def after_epoch(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        self._count(trainer)
        cumulative = self.start_flops + self.flops
        metrics["cumulative_flops"] = cumulative
        trainer.monitor.scalars(epoch, {"cost/cumulative_flops": cumulative})
        monitor = self._flops_monitor(trainer)
        monitor.scalars(flops_axis_step(cumulative), {"test/acc_vs_flops": metrics["test_acc"]})
        monitor.flush()

    def _flops_monitor(self, trainer: Trainer) -> Monitor:
        if self._monitor is None:
            log_dir = trainer.monitor.log_dir
            self._monitor = Monitor(log_dir / FLOPS_AXIS_DIR if log_dir is not None else None)
            if self._resumed:
                self._monitor.purge_from(flops_axis_step(self.start_flops + self.flops))
        return self._monitor

    def finish(self, trainer: Trainer) -> dict:
        """Close the FLOPs-axis events; the phase's cost as JSON: the model's cost per image and
        per layer, images seen, FLOPs spent (both conventions), seconds in all and per epoch."""
        if self._monitor is not None:
            self._monitor.close()
        self._count(trainer)
        return {**self.cost.to_dict(), "images": self.images,
                "images_per_epoch": trainer.train_loader.num_samples, "flops": self.flops,
                "flops_paper": self.cost.train_flops_paper(self.images), "start_flops": self.start_flops,
                "seconds": trainer.seconds, "seconds_per_epoch": [m["seconds"] for m in trainer.history]}

    def load_state_dict(self, state: dict) -> None:
        self._resumed = True


# ---- run-level arithmetic on phase costs (the dicts `CostMeter.finish` returns) ----------------------
def savings(baseline_flops: float, spent_flops: float) -> float:
    """How many times fewer FLOPs than the dense baseline: baseline / spent."""
    return baseline_flops / spent_flops


def search_total(search: dict) -> dict:
    """The search's cost: its training plus the detector's operations, in both conventions."""
    return {"flops": search["flops"] + search["detector_ops"],
            "flops_paper": search["flops_paper"] + search["detector_ops"]}


def baseline_cost(search: dict | None, baseline: dict | None, epochs: int) -> dict:
    """The dense network's cost for the full schedule of `epochs` epochs: measured when the run
    trained it (`baseline`, a phase cost), otherwise the search's dense per-image cost x the images
    of `epochs` epochs."""
    if baseline is not None:
        return {"flops": baseline["flops"], "flops_paper": baseline["flops_paper"], "measured": True,
                "seconds": baseline["seconds"]}
    images = search["images_per_epoch"] * epochs
    return {"flops": search["step_flops"] * images // search["batch_size"],
            "flops_paper": 3 * search["forward_flops_per_image"] * images, "measured": False, "seconds": None}


def search_until(search: dict, epoch: int, num_channels: int) -> dict:
    """What the search cost up to `epoch` for one ratio alone: `epoch` epochs of training (the search
    trains the same dense network every epoch) and the detector's draws of one ratio's mask at epochs
    0 to `epoch`, in both conventions, with the seconds of those epochs."""
    images = search["images_per_epoch"] * epoch
    detector = detector_ops(num_channels, 1, epoch + 1)
    return {"flops": search["step_flops"] * images // search["batch_size"] + detector,
            "flops_paper": 3 * search["forward_flops_per_image"] * images + detector,
            "seconds": sum(search["seconds_per_epoch"][:epoch])}


def ticket_cost(search: dict, ticket: dict, baseline: dict) -> dict:
    """EB-Train's cost for one ticket and its savings against `baseline` (from `baseline_cost`), in both
    conventions, two ways. Shared (`flops`, `savings`, ...): the whole search, which drew every ratio's
    ticket, plus this ticket's retrain. Alone (`alone`): the search up to this ticket's EB epoch, what a
    run asking for this ratio only would have searched, plus its retrain. `ticket` is a retrain result
    (its `cost`, `eb_epoch` and `channels_total`)."""
    retrain = ticket["cost"]
    found = search_total(search)
    flops, paper = found["flops"] + retrain["flops"], found["flops_paper"] + retrain["flops_paper"]
    until = search_until(search, ticket["eb_epoch"], ticket["channels_total"])
    alone, alone_paper = until["flops"] + retrain["flops"], until["flops_paper"] + retrain["flops_paper"]
    return {"flops": flops, "flops_paper": paper, "savings": savings(baseline["flops"], flops),
            "savings_paper": savings(baseline["flops_paper"], paper),
            "seconds": search["seconds"] + retrain["seconds"],
            "alone": {"flops": alone, "flops_paper": alone_paper, "savings": savings(baseline["flops"], alone),
                      "savings_paper": savings(baseline["flops_paper"], alone_paper),
                      "seconds": until["seconds"] + retrain["seconds"]}}


def run_cost(search: dict, tickets: dict[str, dict], baseline: dict | None, epochs: int) -> dict:
    """The cost block of an EB-Train summary: the search (with the detector's share), the baseline,
    each ticket's cost and savings (shared and alone, see `ticket_cost`; `tickets` holds retrain
    results), and the total the run spent (search plus every retrain)."""
    found = search_total(search)
    dense = baseline_cost(search, baseline, epochs)
    return {"convention": CONVENTION,
            "search": {**found, "detector_ops": search["detector_ops"],
                       "detector_share": search["detector_ops"] / max(search["flops"], 1)},
            "baseline": dense,
            "tickets": {name: ticket_cost(search, t, dense) for name, t in tickets.items()},
            "total": {"flops": found["flops"] + sum(t["cost"]["flops"] for t in tickets.values()),
                      "flops_paper": found["flops_paper"] + sum(t["cost"]["flops_paper"] for t in tickets.values())}}
