"""Simulated low-precision training in block floating point (BFP), in plain PyTorch.

The Early-Bird paper's low-cost search trains in "8-bit block floating point" with stochastic rounding
(QPyTorch's `BlockFloatingPoint(wl=8)`) "on weights, activations, gradients, errors and momentum", with
"BN in full precision". This module simulates that arithmetic: every number is rounded to a value the
format can hold and stored in the tensor's own dtype, so it costs time rather than saving it.

What stays in full precision (float32): BatchNorm, the loss, and the output of the model's last conv
or linear layer in module order (the classifier's logits), as in the authors' 8-bit code, whose
classifier is followed by a quantizer of the backward pass only: the error arriving at the logits is
rounded, and so are the classifier's weights, gradients and momentum, like every other layer's.

The format, QPyTorch's `block_quantize` convention (its CPU kernel adds 6 * 2^e to x and rounds the sum
to `wl` mantissa bits, which is a grid of 2^(e + 2 - wl)). A block of numbers shares one exponent

    e = floor(log2(max |x| over the block)),

and each number is a signed integer mantissa k times the block's step

    delta = 2^(e - (bits - 2)),   |k| <= 2^(bits - 1) - 1   (one sign bit, bits - 1 magnitude bits),

so the block's largest magnitude, which lies in [2^e, 2^(e+1)), keeps bits - 1 significant bits and
smaller numbers keep fewer (those below delta / 2 become 0); a block holds at most 2^bits - 1 values.
Rounding is stochastic, k = floor(x / delta + u), with u on the midpoints of 2^16 equal bins of [0, 1)
drawn from a seeded generator (so E[k delta] = x to within delta 2^-17), or to nearest, ties to even.
A number that rounds past the largest mantissa saturates at +-(2^(bits - 1) - 1) delta, and a block of
zeros stays zero. Where this differs from QPyTorch: the block maximum is max |x| (QPyTorch's per-dim
path takes |max x|, which misreads a block whose largest magnitude is negative); nearest rounding sends
ties to even (QPyTorch's bit arithmetic sends them away from zero); and e is kept at or above
bits - 128 so that delta is a normal float32 number (this only touches blocks whose largest magnitude
is below 2^(bits - 128), about 1e-36 for 8 bits). A block holding inf or NaN becomes all NaN, so a
diverging run still shows in its loss.

Blocks. A block is a slice along dim 0 of every tensor quantized here: one per output channel for conv
and linear weights, their gradients and momentum (a bias, being 1-D, has one block per element), and
one per sample for activations and errors.
"""
from __future__ import annotations

import hashlib
import sys

import torch
import torch.nn as nn

from . import distributed
from .train import Hook, Trainer

ROUNDINGS = ("stochastic", "nearest")
QUANTIZED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _check_format(bits: int, rounding: str) -> None:
    if not 2 <= bits <= 24:
        raise ValueError(f"bits = {bits}: block floating point words here hold 2 to 24 bits")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding = {rounding!r}: choose from {', '.join(ROUNDINGS)}")


def _uniform_offsets(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Random int16 r per element; r / 2^16 + 1/2 + 2^-17 is uniform on the midpoints of 2^16 bins of [0, 1).

    16 bits keep stochastic rounding unbiased to within 2^-17 of a step, in half the memory of float32
    offsets. Drawn as int16 directly: reinterpreting each int64 draw as four int16 needs a quarter of the
    draws (on CPU a bfp_quantize call took about 2/3 as long) but breaks torch.compile, whose AOTAutograd
    cannot rebuild a dtype view whose element count differs from its base's.
    """
    return torch.randint(-2**15, 2**15, shape, generator=generator, device=device, dtype=torch.int16)


def bfp_quantize(x: torch.Tensor, bits: int = 8, rounding: str = "stochastic",
                 generator: torch.Generator | None = None, *, inplace: bool = False) -> torch.Tensor:
    """`x` rounded to block floating point with `bits`-bit words, one block per slice along dim 0.

    rounding: 'stochastic' (random draws from `generator`, which must live on x's device) or
    'nearest'. Returns a new tensor of x's shape and dtype, or x itself, overwritten, when `inplace`.
    The format is described in the module docstring.
    """
    _check_format(bits, rounding)
    # bf16 (autocast on CUDA) has too few bits to hold x / delta + u; round in float32
    xf = x.float()
    if x.dim() > 1:
        dims = tuple(range(1, x.dim()))
        # max and -min rather than abs().amax(): no temporary as large as x
        magnitude = torch.maximum(xf.amax(dim=dims, keepdim=True), xf.amin(dim=dims, keepdim=True).neg_())
    else:
        magnitude = xf.abs()
    # the floor keeps delta a normal float32 number and gives a block of zeros some exponent
    magnitude.clamp_(min=2.0 ** (bits - 128))
    # 2^e is the float's exponent field alone: bit arithmetic, exact where log2 and exp2 may round
    step = (magnitude.view(torch.int32) & 0x7F800000).view(torch.float32).mul_(2.0 ** (2 - bits))
    # x / delta, exact: delta is a power of two
    scaled = xf.mul_(step.reciprocal()) if inplace and xf is x else xf * step.reciprocal()
    if rounding == "stochastic":
        offsets = _uniform_offsets(scaled.shape, generator, scaled.device)
        scaled.add_(offsets, alpha=2**-16).add_(0.5 + 2**-17).floor_()
    else:
        scaled.round_()
    largest = 2 ** (bits - 1) - 1
    scaled.clamp_(-largest, largest).mul_(step)
    if not inplace:
        return scaled.to(x.dtype)
    return x if scaled is x else x.copy_(scaled)


class _RoundActivation(torch.autograd.Function):
    """Rounds a layer's output on the forward pass and the error arriving at it on the backward pass.

    The rounding itself counts as the identity for differentiation (straight-through), as in QPyTorch's
    Quantizer, so the only change to the gradient is that the error is rounded too.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantization: "BFPTraining", stochastic: bool) -> torch.Tensor:
        ctx.quantization = quantization
        # in place, sparing a copy of every activation: conv and linear backward do not read their output
        # (were one to, autograd's version check would refuse the backward rather than go wrong)
        ctx.mark_dirty(x)
        return quantization.quantize(x, stochastic, inplace=True)

    @staticmethod
    def backward(ctx, error: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.quantization.quantize(error, True), None, None


class _RoundError(torch.autograd.Function):
    """The last layer's: its output passes unrounded, the error arriving at it is rounded."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantization: "BFPTraining") -> torch.Tensor:
        ctx.quantization = quantization
        return x.view_as(x)

    @staticmethod
    def backward(ctx, error: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.quantization.quantize(error, True), None


class BFPTraining(Hook):
    """Trains `model` in simulated block floating point: attach to a Trainer as a hook.

    Rounds, with `bits`-bit words: the output of every conv and linear layer but the last in module
    order (forward) and the error arriving at every one of them (backward), through forward hooks on
    those layers; their parameters' gradients before the optimizer step; their weights and SGD momentum
    buffers after it. BatchNorm, the loss and the last layer's output (the logits) stay in full
    precision. Training rounds with `rounding`; evaluation
    (eval mode) rounds activations to nearest, so a test score does not depend on random draws. The
    random draws come from one generator on `device` seeded with `seed`, saved in the trainer's
    checkpoint for an exact resume on the same kind of device (on another, `load_state_dict` re-seeds).
    The weights are rounded (to nearest) already here, so the first step sees BFP weights too.
    """

    def __init__(self, model: nn.Module, *, bits: int = 8, rounding: str = "stochastic", seed: int = 0,
                 device: torch.device | str = "cpu"):
        _check_format(bits, rounding)
        self.bits = bits
        self.rounding = rounding
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        layers = [m for m in model.modules() if isinstance(m, QUANTIZED_LAYERS)]
        self.params = [p for layer in layers for p in layer.parameters(recurse=False)]
        for layer in layers[:-1]:
            layer.register_forward_hook(self._round_output)
        if layers:  # the classifier hands the loss unrounded logits
            layers[-1].register_forward_hook(self._round_error)
        with torch.no_grad():
            for p in self.params:
                # nearest: the generator may live on another device than the model before Trainer moves it
                bfp_quantize(p, bits, "nearest", inplace=True)

    def quantize(self, x: torch.Tensor, stochastic: bool, inplace: bool = False) -> torch.Tensor:
        """`x` in this hook's format: its rounding when `stochastic`, else to nearest."""
        rounding = self.rounding if stochastic else "nearest"
        return bfp_quantize(x, self.bits, rounding, self.generator, inplace=inplace)

    def _round_output(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return _RoundActivation.apply(output, self, module.training)

    def _round_error(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return _RoundError.apply(output, self)

    def after_backward(self, trainer: Trainer) -> None:
        for p in self.params:
            if p.grad is not None:
                self.quantize(p.grad, True, inplace=True)

    @torch.no_grad()
    def after_step(self, trainer: Trainer) -> None:
        for p in self.params:
            self.quantize(p, True, inplace=True)
            momentum = trainer.optimizer.state.get(p, {}).get("momentum_buffer")
            if momentum is not None:
                self.quantize(momentum, True, inplace=True)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Continue the random draws saved by `state_dict`, exactly where the device kind is the same.

        A generator's state belongs to its kind of device (CPU: a 5,056-byte Mersenne Twister; CUDA: a
        16-byte Philox seed and offset) and does not load into another kind. A run resumed on another
        kind of device re-seeds instead, from a hash of the saved state: deterministic and different for
        every checkpoint, but not the draws an uninterrupted run would have made.
        """
        saved = state["generator"]
        if saved.numel() == self.generator.get_state().numel():
            self.generator.set_state(saved)
            return
        self.generator.manual_seed(_seed_from(saved))
        if distributed.is_main():
            print(f"ebtrain: the {self.bits}-bit rounding's random state was saved on another kind of device; "
                  "re-seeded from it, so the resumed run rounds with draws of its own", file=sys.stderr, flush=True)


def _seed_from(state: torch.Tensor) -> int:
    """A 63-bit seed that depends on every byte of a generator state."""
    digest = hashlib.sha256(state.cpu().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
