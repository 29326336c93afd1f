import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from ebtrain import checkpoint
from ebtrain.pipeline import eb_train
from ebtrain.models import build_model, list_models
from ebtrain.quant import QUANTIZED_LAYERS, BFPTraining, bfp_quantize
from ebtrain.rundir import prepare_run_dir

from conftest import tiny_config


def on_grid(t: torch.Tensor, bits: int) -> bool:
    """Every slice along dim 0 is integer multiples k of 2^(floor(log2 max|slice|) - (bits-2)), |k| < 2^(bits-1)."""
    for block in t.detach().double().reshape(len(t), -1):
        top = block.abs().max().item()
        if top == 0:
            continue
        k = block / 2.0 ** (math.floor(math.log2(top)) - (bits - 2))
        if not (torch.equal(k, k.round()) and k.abs().max() <= 2 ** (bits - 1) - 1):
            return False
    return True


def test_hand_computed_blocks_round_to_nearest():
    x = torch.tensor([[1.0, 0.3, -0.26],      # e = 0, delta = 2^-2: 4, 1.2, -1.04 steps
                      [1.9, 0.1, 0.0],        # 7.6 steps rounds to 8: saturates at 7 * delta
                      [0.0, 0.0, 0.0],        # a block of zeros stays zero
                      [-3.0, 0.75, 0.625],    # max |x| is negative: e = 1, delta = 2^-1; 1.5 and 1.25 steps
                      [1.0, 0.375, -0.625]])  # ties (1.5, -2.5 steps) go to even
    expected = torch.tensor([[1.0, 0.25, -0.25],
                             [1.75, 0.0, 0.0],
                             [0.0, 0.0, 0.0],
                             [-3.0, 1.0, 0.5],
                             [1.0, 0.5, -0.5]])
    assert torch.equal(bfp_quantize(x, bits=4, rounding="nearest"), expected)
    # 8 bits, small exponent: max 0.0123 -> e = -7, delta = 2^-13; 100.76 and -40.96 steps
    small = bfp_quantize(torch.tensor([[0.0123, -0.005]]), bits=8, rounding="nearest")
    assert torch.equal(small, torch.tensor([[101.0, -41.0]]) / 8192)
    # a block holding inf becomes NaN, and its neighbours are untouched
    assert torch.equal(bfp_quantize(torch.tensor([[float("inf"), 1.0], [0.5, 0.25]]), 4, "nearest").isnan(),
                       torch.tensor([[True, True], [False, False]]))
    # a 1-D tensor (a bias) has one block per element
    assert torch.equal(bfp_quantize(torch.tensor([3.3, -1e-3]), bits=4, rounding="nearest"),
                       torch.tensor([3.5, -4 / 4096]))


def test_stochastic_rounding_is_unbiased_and_seeded():
    x = torch.tensor([1.0, 0.3, -0.26]).repeat(100_000, 1)  # 100,000 blocks, each drawn independently
    q = bfp_quantize(x, bits=4, rounding="stochastic", generator=torch.Generator().manual_seed(0))
    assert set(q[:, 1].tolist()) == {0.25, 0.5} and set(q[:, 2].tolist()) == {-0.25, -0.5}
    # a draw's standard deviation is delta * sqrt(p(1-p)) <= 0.125, so the mean's is below 4e-4
    assert torch.allclose(q.mean(0), x[0], atol=2e-3)
    again = bfp_quantize(x, bits=4, rounding="stochastic", generator=torch.Generator().manual_seed(0))
    assert torch.equal(q, again)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_at_most_2_to_the_bits_values_per_block(bits, rounding):
    x = torch.randn(4, 20_000) * torch.tensor([[1e-3], [1.0], [7.0], [1e4]])
    q = bfp_quantize(x, bits, rounding, torch.Generator().manual_seed(1))
    for block in q:
        assert 2 ** (bits - 2) < block.unique().numel() <= 2 ** bits
    assert on_grid(q, bits)


def test_bfloat16_is_rounded_in_float32_and_returned_as_bfloat16():
    x = torch.tensor([[1.0, 0.3]], dtype=torch.bfloat16).repeat(20_000, 1)
    q = bfp_quantize(x, bits=4, generator=torch.Generator().manual_seed(0))
    assert q.dtype == torch.bfloat16
    assert abs(q[:, 1].float().mean().item() - x[0, 1].item()) < 5e-3


def test_activations_and_errors_are_rounded_and_gradients_flow():
    torch.manual_seed(0)
    layer = nn.Linear(5, 6)
    errors = []

    def capture_error(module, inputs, output):
        if output.requires_grad:
            output.register_hook(errors.append)

    # registered before the quantization's hook, so it sees the layer's own output, and the gradient
    # with respect to that output is the error after the backward rounding
    layer.register_forward_hook(capture_error)
    BFPTraining(nn.Sequential(layer, nn.Linear(6, 2)), bits=4, seed=0)  # the last layer's output is not rounded
    assert on_grid(layer.weight, 4)  # rounded when attached
    x = torch.randn(8, 5, requires_grad=True)
    out = layer(x)
    assert on_grid(out, 4)
    upstream = torch.randn(8, 6)
    out.backward(upstream)
    error = errors[0]
    assert on_grid(error, 4) and not on_grid(upstream, 4)
    # each entry is the upstream gradient rounded to a neighbour on its sample's grid
    step = 2.0 ** (torch.floor(torch.log2(upstream.abs().amax(1, keepdim=True))) - 2)
    assert ((error - upstream).abs() <= step).all() and not torch.equal(error, upstream)
    # the rounded error is what flows on, to the input and to the weight
    assert torch.allclose(x.grad, error @ layer.weight.detach(), atol=1e-6)
    assert torch.allclose(layer.weight.grad, error.T @ x.detach(), atol=1e-6)
    # evaluation rounds to nearest, so it is deterministic
    layer.eval()
    with torch.no_grad():
        expected = bfp_quantize(nn.functional.linear(x, layer.weight, layer.bias), 4, "nearest")
        assert torch.equal(layer(x), expected) and torch.equal(layer(x), expected)


def test_gradients_weights_and_momentum_lie_on_the_grid_after_a_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    hook = BFPTraining(model, bits=8, seed=0)
    quantized = [model[0].weight, model[0].bias, model[4].weight, model[4].bias]  # the last layer's too
    full_precision = [model[1].weight, model[1].bias]  # BatchNorm
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    trainer = SimpleNamespace(optimizer=optimizer)
    for _ in range(2):  # the second step also reads the rounded momentum
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(16, 3, 6, 6)), torch.randint(0, 3, (16,))).backward()
        hook.after_backward(trainer)
        assert all(on_grid(p.grad, 8) for p in quantized)
        assert not any(on_grid(p.grad, 8) for p in full_precision)
        optimizer.step()
        hook.after_step(trainer)
        assert all(on_grid(p, 8) for p in quantized)
        assert all(on_grid(optimizer.state[p]["momentum_buffer"], 8) for p in quantized)
        assert not any(on_grid(p, 8) or on_grid(optimizer.state[p]["momentum_buffer"], 8) for p in full_precision)


def test_the_last_layer_hands_the_loss_unrounded_logits_and_gets_a_rounded_error():
    # as the authors' 8-bit code: the classifier is followed by a quantizer of the backward pass only
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    errors = []

    def capture_error(module, inputs, output):
        output.register_hook(errors.append)

    model[2].register_forward_hook(capture_error)  # before the quantization's hook: the layer's own output
    BFPTraining(model, bits=4, seed=0)
    assert on_grid(model[2].weight, 4)  # its weights are rounded like every layer's
    x = torch.randn(8, 6, requires_grad=True)
    logits = model[2](x)
    assert not on_grid(logits, 4)
    upstream = torch.randn(8, 3)
    logits.backward(upstream)
    assert on_grid(errors[0], 4) and not on_grid(upstream, 4)
    assert torch.allclose(x.grad, errors[0] @ model[2].weight.detach(), atol=1e-6)


def test_the_last_layer_in_module_order_is_every_models_classifier():
    for name in list_models():
        model = build_model(name, num_classes=7, in_channels=1, width=0.125, image_size=28)
        last = [m for m in model.modules() if isinstance(m, QUANTIZED_LAYERS)][-1]
        assert isinstance(last, nn.Linear) and last.out_features == 7, name


def _train_two_steps(model: nn.Module, hook: BFPTraining, forward) -> list[torch.Tensor]:
    """Two SGD steps with the hook's rounding; returns each step's output."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = SimpleNamespace(optimizer=optimizer)
    data = torch.Generator().manual_seed(1)
    outputs = []
    for _ in range(2):
        x, y = torch.randn(8, 3, 4, 4, generator=data), torch.randint(0, 3, (8,), generator=data)
        optimizer.zero_grad()
        out = forward(x)
        nn.functional.cross_entropy(out, y).backward()
        hook.after_backward(trainer)
        optimizer.step()
        hook.after_step(trainer)
        outputs.append(out.detach())
    return outputs


def test_compiled_training_step_rounds_like_eager():
    def tiny_net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 4 * 4, 3))

    eager_model, compiled_model = tiny_net(), tiny_net()
    eager = _train_two_steps(eager_model, BFPTraining(eager_model, seed=0), eager_model)
    # the random draws used to reinterpret int64 as int16, which AOTAutograd could not rebuild
    compiled = _train_two_steps(compiled_model, BFPTraining(compiled_model, seed=0), torch.compile(compiled_model))
    # the same draws in the same order; compiled BatchNorm may differ in the last bits, which can move a
    # rounded activation by one step (2^-6 for outputs below 2)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=2**-5)
    assert on_grid(compiled_model[0].weight, 8)


def test_generator_state_round_trips_for_resume():
    hook = BFPTraining(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), seed=3)
    state = hook.state_dict()
    x = torch.randn(10, 10)
    first = hook.quantize(x, True)
    hook.load_state_dict(state)
    assert torch.equal(hook.quantize(x, True), first)


def test_generator_state_from_another_device_kind_reseeds_deterministically(capsys):
    # a CUDA generator's state is a 16-byte Philox seed and offset; a CPU generator's, 5,056 bytes
    philox = torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)
    x = torch.randn(10, 10)
    draws = []
    for state in (philox, philox, philox.flip(0)):
        hook = BFPTraining(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), seed=3)
        hook.load_state_dict({"generator": state})
        draws.append(hook.quantize(x, True))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert "saved on another kind of device" in capsys.readouterr().err


def test_quantized_search_draws_tickets_and_retrains_in_full_precision(tmp_path):
    cfg = tiny_config(tmp_path, search={"ratios": [0.5], "eps": 0.9, "queue_length": 2, "precision": "bfp8"},
                      train={"epochs": 3})
    run = prepare_run_dir(cfg)
    summary = eb_train(cfg, run)
    search = summary["search"]
    assert (search["precision"], search["bits"], search["pending"]) == ("bfp8", 8, [])
    assert summary["tickets"]["p50"]["precision"] == "fp32"
    # the search's FLOPs are reported as 8-bit operations, apart from the fp32 retrain's
    assert search["cost"]["flops_precision"] == summary["cost"]["search"]["flops_precision"] == "bfp8"
    ticket = checkpoint.load(run / "tickets" / "p50.pt")
    state = ticket["state_dict"]
    layers = [k for k in state if k.endswith("weight") and state[k].dim() > 1]
    assert "classifier.weight" in layers and all(on_grid(state[k], 8) for k in layers)
    # the retrain ran without rounding: its weights left the grid
    retrained = checkpoint.load(run / "retrain" / "p50" / "checkpoint.pt")["model"]
    assert not any(on_grid(retrained[k], 8) for k in retrained if k.endswith("weight") and retrained[k].dim() > 1)
