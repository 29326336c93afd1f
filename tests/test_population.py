"""The population engine: K networks trained in lockstep, batched or one at a time, with masks that hold."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ebtrain.config import TrainConfig
from ebtrain.data import BatchLoader, load_data
from ebtrain.lottery.masks import prunable_weights
from ebtrain.lottery.population import Member, Population, _stacked_layer, train_members, train_step
from ebtrain.lottery.sparse import SPARSE_BELOW, BlockSparse
from ebtrain.models import build_model
from ebtrain.train import make_optimizer

from conftest import ROOT, lottery_config

pytestmark = pytest.mark.usefixtures("one_thread")


def lenet_members(count, density=0.3, optimizer_seed=0):
    generator = torch.Generator().manual_seed(optimizer_seed)
    members = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = build_model("lenet300_100", in_channels=1, image_size=8, width=0.25)
        masks = {n: torch.rand(model.state_dict()[n].shape, generator=generator) < density
                 for n in prunable_weights(model)}
        members.append(Member(seed, ["ticket", "reinit", "random-prune"][seed % 3], model.state_dict(), masks))
    return members


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("count", [1, 3])
def test_pruned_weights_stay_zero_with_no_update_or_optimizer_state(optimizer, count):
    members = lenet_members(count)
    pop = Population(build_model("lenet300_100", in_channels=1, image_size=8, width=0.25), members,
                     torch.device("cpu"))
    cfg = TrainConfig(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-2, momentum=0.9, weight_decay=5e-3)
    opt = make_optimizer(list(pop.params.values()), cfg, fused=True)
    start = {n: p.detach().clone() for n, p in pop.params.items()}
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        x = torch.randn(count, 16, 1, 8, 8, generator=generator)
        train_step(pop, opt, x, torch.randint(4, (count, 16), generator=generator))
    for name, mask in pop.masks.items():
        weight = pop.params[name].detach()
        assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask])), name
        assert not torch.equal(weight[mask], start[name][mask]), f"{name}: kept weights did not train"
        for key, value in opt.state[pop.params[name]].items():
            if value.shape == weight.shape:  # momentum buffer, exp_avg, exp_avg_sq
                assert not value[~mask].any(), f"{name}: {key} is not zero at pruned weights"
    unmasked = [n for n in pop.params if n not in pop.masks]
    assert unmasked and all(not torch.equal(pop.params[n], start[n]) for n in unmasked)  # biases train


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.05), ("adam", 2e-3)])
def test_population_of_one_matches_a_plain_module_with_torch_optim(tmp_path, optimizer, lr):
    # the stacked, fused optimizer against the Trainer's per-module optimizer, same batches and masks
    cfg = lottery_config(tmp_path, train={"optimizer": optimizer, "lr": lr, "momentum": 0.9, "weight_decay": 1e-3,
                                          "batch_size": 32})
    data = load_data(cfg.data, seed=1)
    [member] = lenet_members(1)
    _, [final], _ = train_members(lambda: build_model("lenet300_100", in_channels=1, image_size=8, width=0.25),
                                  [member], data, cfg.train, torch.device("cpu"), iterations=20, eval_every=20)
    model = build_model("lenet300_100", in_channels=1, image_size=8, width=0.25)
    model.load_state_dict({n: t * member.masks[n] if n in member.masks else t for n, t in member.state.items()})
    opt = make_optimizer(list(model.parameters()), cfg.train, fused=False)  # the Trainer's on the CPU
    loader = BatchLoader(data.train, 32, mean=data.mean, std=data.std, shuffle=True, seed=member.seed)
    steps = 0
    for epoch in range(10):
        loader.set_epoch(epoch)
        for x, y in loader:
            if steps == 20:
                break
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            for name, p in model.named_parameters():
                if name in member.masks:
                    p.grad *= member.masks[name]
            opt.step()
            steps += 1
    for name, value in model.state_dict().items():
        torch.testing.assert_close(final[name], value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch,density", [("lenet300_100", 0.4), ("conv2", 0.4),
                                          ("lenet300_100", SPARSE_BELOW / 3)])  # block-sparse input layer
def test_batched_training_equals_one_at_a_time(tmp_path, arch, density):
    cfg = lottery_config(tmp_path, model={"arch": arch}, data={"channels": 3})
    data = load_data(cfg.data, seed=1)

    def make_model():
        return build_model(arch, num_classes=4, in_channels=3, image_size=8, width=0.25)

    members = []
    generator = torch.Generator().manual_seed(0)
    for seed, arm in ((1, "ticket"), (1, "reinit"), (2, "ticket")):  # two share a data order, as arms do
        torch.manual_seed(seed * 10 + len(members))
        state = make_model().state_dict()
        masks = {n: torch.rand(state[n].shape, generator=generator) < density for n in prunable_weights(make_model())}
        members.append(Member(seed, arm, state, masks))
    sparse = Population(make_model(), members, torch.device("cpu"), sparse_below=SPARSE_BELOW).sparse
    assert list(sparse) == (["layers.1.weight"] if density < SPARSE_BELOW and arch == "lenet300_100" else [])
    run = dict(data=data, cfg=cfg.train, device=torch.device("cpu"), iterations=8, eval_every=2)
    batched = train_members(make_model, members, batched=True, **run)
    alone = train_members(make_model, members, batched=False, **run)
    for got, want in zip(batched[0], alone[0]):
        assert got["early_stop_iter"] == want["early_stop_iter"]
        for key in ("test_acc_early", "test_acc_final", "train_acc_final", "val_loss_min"):
            assert got[key] == pytest.approx(want[key], abs=2e-3), key
    for got, want in zip(batched[1], alone[1]):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_block_sparse_layer_matches_the_masked_dense_layer():
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 5, 7, generator=generator) < 0.3
    mask[1, 2] = False  # a unit with no input left, and a network's block with rows of every kind
    weight = torch.randn(3, 5, 7, generator=generator) * mask
    pattern = BlockSparse(mask)
    torch.testing.assert_close(pattern.stacked(pattern.values(weight)), weight, rtol=0, atol=0)
    torch.testing.assert_close(pattern.matrix(pattern.values(weight)).to_dense(), torch.block_diag(*weight))
    x = torch.randn(3, 4, 7, generator=generator)
    bias = torch.randn(3, 5, generator=generator, requires_grad=True)
    values = pattern.values(weight).requires_grad_()
    dense = weight.clone().requires_grad_()
    out = _stacked_layer(torch.nn.Linear(7, 5), {"weight": values, "bias": bias}, x, pattern)
    want = _stacked_layer(torch.nn.Linear(7, 5), {"weight": dense, "bias": bias}, x)
    torch.testing.assert_close(out, want)
    g = torch.randn(3, 4, 5, generator=generator)
    (grad_values, grad_bias) = torch.autograd.grad((out * g).sum(), (values, bias))
    (grad_dense, grad_bias_dense) = torch.autograd.grad((want * g).sum(), (dense, bias))
    torch.testing.assert_close(pattern.stacked(grad_values), grad_dense * mask)
    torch.testing.assert_close(grad_bias, grad_bias_dense)


def test_the_block_sparse_layer_leaves_no_warning_behind():
    # torch warns once per process that CSR tensors are beta: a fresh process, every warning an error
    script = """
import warnings
warnings.simplefilter("error")
import torch
from ebtrain.lottery.population import _stacked_layer
from ebtrain.lottery.sparse import BlockSparse
mask = torch.rand(2, 5, 7) < 0.3
pattern = BlockSparse(mask)
values = pattern.values(torch.randn(2, 5, 7)).requires_grad_()
out = _stacked_layer(torch.nn.Linear(7, 5), {"weight": values, "bias": torch.zeros(2, 5)}, torch.randn(2, 4, 7), pattern)
out.sum().backward()
message = "Sparse CSR tensor support is in beta state."  # torch's warning, as it begins
assert not [f for f in warnings.filters if f[1] and f[1].match(message)], "a global filter was installed"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_lottery_training_warms_up_iteration_by_iteration(tmp_path, monkeypatch):
    # --warmup-iter 4 and a milestone at iteration 6: the rate of every iteration, as the optimizer steps with it
    from ebtrain.lottery import population
    cfg = lottery_config(tmp_path, train={"optimizer": "sgd", "lr": 0.04, "warmup_iter": 4, "milestones": [6]})
    data = load_data(cfg.data, seed=1)
    rates, step = [], population.train_step
    monkeypatch.setattr(population, "train_step",
                        lambda pop, opt, x, y: (rates.append(opt.param_groups[0]["lr"]), step(pop, opt, x, y)))
    train_members(lambda: build_model("lenet300_100", in_channels=1, image_size=8, width=0.25), lenet_members(2),
                  data, cfg.train, torch.device("cpu"), iterations=8, eval_every=8)
    assert rates == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.04, 0.04, 0.004, 0.004])
