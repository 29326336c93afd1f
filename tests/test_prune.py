"""Channel pruning: the pruned network computes what the switched-off dense network computes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ebtrain import checkpoint
from ebtrain.earlybird import channel_scores, draw_mask
from ebtrain.errors import UserError
from ebtrain.models import build_model, count_params, load_model, save_model
from ebtrain.models.preresnet import ChannelSelection
from ebtrain.models.resnet import BasicBlock
from ebtrain.pipeline import eb_train
from ebtrain.prune import kept_channels, load_pruned, prune_channels, round_keep, switch_off_channels
from ebtrain.rundir import prepare_run_dir

from conftest import tiny_config

FAMILIES = {
    "vgg16": {"width": 0.125},
    "preresnet": {"depth": 20, "width": 0.5},
    "resnet20": {"width": 0.5},
    "resnet18": {"width": 0.125},
    "resnet18_imagenet": {"width": 0.125},
    "resnet50_imagenet": {"width": 0.125},
}
RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def randomized(name: str, seed: int) -> nn.Module:
    """A model whose BNs look trained (random affine and running stats) and whose classifier is
    scaled up, so outputs are O(1) and a 1e-5 tolerance means something."""
    torch.manual_seed(seed)
    model = build_model(name, **FAMILIES[name])
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.normal_()
                module.bias.normal_()
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 1.0)
    return model.eval()


def random_keep(model: nn.Module, ratio: float, generator: torch.Generator) -> list[torch.Tensor]:
    """Each channel pruned with probability `ratio`, at least one channel kept per layer."""
    keep = []
    for _, bn in model.prunable_bns():
        mask = torch.rand(bn.num_features, generator=generator) >= ratio
        mask[torch.randint(bn.num_features, (1,), generator=generator)] = True
        keep.append(mask)
    return keep


def vgg_param_count(cfg: list, in_channels: int, num_classes: int) -> int:
    """Conv3x3 without bias + BN (weight, bias) per channel count, then one linear layer."""
    total, channels = 0, in_channels
    for entry in cfg:
        if entry != "M":
            total += channels * entry * 9 + 2 * entry
            channels = entry
    return total + channels * num_classes + num_classes


def resnet_param_count(model: nn.Module, inner: list[int]) -> int:
    """The dense count minus what cutting each block's inner width to `inner` removes."""
    total = count_params(model)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    for block, kept in zip(blocks, inner):
        removed = block.conv1.out_channels - kept
        total -= removed * (block.conv1.in_channels * 9 + 2 + block.conv2.out_channels * 9)
    return total


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("ratio", RATIOS)
def test_pruned_equals_switched_off(name, ratio):
    model = randomized(name, seed=int(ratio * 10))
    generator = torch.Generator().manual_seed(int(ratio * 100))
    keep = random_keep(model, ratio, generator)
    pruned = prune_channels(model, keep).eval()
    reference = switch_off_channels(model, keep).eval()
    x = torch.randn(4, 3, 32, 32, generator=generator)
    with torch.no_grad():  # in float64: ResNet-50's outputs reach O(100), where float32 rounding alone is 1e-5
        out, expected = pruned.double()(x.double()), reference.double()(x.double())
    assert out.abs().max() > 0.1  # a network whose output vanished would pass trivially
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert type(pruned) is type(model)
    assert [bn.num_features for _, bn in pruned.prunable_bns()] != \
        [bn.num_features for _, bn in model.prunable_bns()]
    assert count_params(pruned) < count_params(model)


@pytest.mark.parametrize("ratio", RATIOS)
def test_vgg_parameter_count_by_hand(ratio):
    model = randomized("vgg16", seed=0)
    keep = random_keep(model, ratio, torch.Generator().manual_seed(1))
    pruned = prune_channels(model, keep)
    cfg = pruned.arch["cfg"]
    assert [c for c in cfg if c != "M"] == kept_channels(keep)
    assert [c == "M" for c in cfg] == [c == "M" for c in model.arch["cfg"]]
    assert count_params(pruned) == vgg_param_count(cfg, 3, 10)
    assert count_params(model) == vgg_param_count(model.arch["cfg"], 3, 10)


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_resnet_parameter_count_by_hand(name):
    model = randomized(name, seed=0)
    keep = random_keep(model, 0.5, torch.Generator().manual_seed(2))
    pruned = prune_channels(model, keep)
    assert pruned.arch["cfg"] == kept_channels(keep)
    assert count_params(pruned) == resnet_param_count(model, kept_channels(keep))


def test_preresnet_cfg_and_selection_masks():
    model = randomized("preresnet", seed=0)
    keep = random_keep(model, 0.5, torch.Generator().manual_seed(3))
    pruned = prune_channels(model, keep)
    assert pruned.arch["cfg"] == kept_channels(keep)  # dense selections: kept counts in BN order
    selections = [m for m in pruned.modules() if isinstance(m, ChannelSelection)]
    bn1s = [k for (n, _), k in zip(model.prunable_bns(), keep) if n.endswith("bn1") or n == "bn"]
    assert all(torch.equal(s.mask, k) for s, k in zip(selections, bn1s))
    # Residual widths are never cut: the full-width BNs before each selection survive whole.
    assert pruned.bn.num_features == model.bn.num_features


def test_preresnet_prunes_again():
    model = randomized("preresnet", seed=0)
    generator = torch.Generator().manual_seed(4)
    once = prune_channels(model, random_keep(model, 0.3, generator)).eval()
    keep = random_keep(once, 0.3, generator)
    # Keep at least one channel that each selection still passes on.
    selections = [m.mask for m in once.modules() if isinstance(m, ChannelSelection)]
    bn1_positions = [i for i, (n, _) in enumerate(once.prunable_bns()) if n.endswith("bn1") or n == "bn"]
    for i, mask in zip(bn1_positions, selections):
        keep[i][mask.nonzero()[0]] = True
    twice = prune_channels(once, keep).eval()
    x = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(twice(x), switch_off_channels(once, keep).eval()(x),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_pruned_arch_rebuilds_and_round_trips(tmp_path, name):
    model = randomized(name, seed=5)
    pruned = prune_channels(model, random_keep(model, 0.6, torch.Generator().manual_seed(6))).eval()
    rebuilt = build_model(**pruned.arch)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in pruned.state_dict().items()}
    path = tmp_path / "pruned.pt"
    save_model(pruned, path)
    loaded = load_pruned(path)
    assert load_pruned is load_model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


def test_prune_leaves_source_untouched_and_keeps_mode():
    model = randomized("resnet20", seed=0).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keep = random_keep(model, 0.5, torch.Generator().manual_seed(7))
    pruned = prune_channels(model, keep)
    switch_off_channels(model, keep)
    assert pruned.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_keep_mask_errors():
    model = randomized("vgg16", seed=0)
    keep = [torch.ones(bn.num_features, dtype=torch.bool) for _, bn in model.prunable_bns()]
    with pytest.raises(ValueError, match="13 prunable BNs"):
        prune_channels(model, keep[:-1])
    with pytest.raises(ValueError, match="shape"):
        prune_channels(model, [torch.ones(3, dtype=torch.bool)] + keep[1:])
    keep[2] = torch.zeros_like(keep[2])
    with pytest.raises(ValueError, match="every channel of features.8"):
        prune_channels(model, keep)
    with pytest.raises(UserError, match="no prunable channels"):
        prune_channels(build_model("lenet300_100", width=0.1), [])
    with pytest.raises(UserError, match="no prunable channels"):
        switch_off_channels(build_model("conv2", width=0.1), [])


def test_keep_all_is_identity():
    model = randomized("preresnet", seed=0)
    keep = [torch.ones(bn.num_features) for _, bn in model.prunable_bns()]  # 0/1 floats accepted
    pruned = prune_channels(model, keep).eval()
    assert pruned.arch == model.arch
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))


def test_kept_channels():
    assert kept_channels([torch.tensor([True, False, True]), torch.tensor([False, True])]) == [2, 1]


# ---- rounding kept channels up to a multiple -----------------------------------------------------
def test_round_keep_rounds_each_layer_up_to_a_multiple_capped_at_its_size():
    generator = torch.Generator().manual_seed(8)
    sizes = [5, 16, 20, 3, 64, 9]
    keep = [torch.rand(n, generator=generator) < 0.4 for n in sizes]
    for k in keep:
        k[0] = True
    scores = [torch.rand(n, generator=generator) for n in sizes]
    rounded = round_keep(keep, scores, 8)
    for k, r, n in zip(keep, rounded, sizes):
        assert int(r.sum()) == min(-(-int(k.sum()) // 8) * 8, n)
        assert bool((r | ~k).all())  # every channel the mask kept is still kept
    assert kept_channels(rounded)[0] == 5 and kept_channels(rounded)[3] == 3  # layers smaller than 8: all


def test_round_keep_adds_back_the_highest_scored_pruned_channels():
    keep = [torch.tensor([True, False, False, True, False, False, False]), torch.tensor([True, False, False])]
    scores = [torch.tensor([0.1, 0.9, 0.3, 0.2, 0.7, 0.05, 0.3]), torch.tensor([1.0, 2.0, 2.0])]
    rounded = round_keep(keep, scores, 4)
    # 2 kept -> 4: the two best pruned channels (0.9, 0.7); 1 kept -> 3 (capped): both of the others
    assert rounded[0].tolist() == [True, True, False, True, True, False, False]
    assert rounded[1].tolist() == [True, True, True]
    # ties among pruned channels go to the lower channel index (0.3 at 2 before 0.3 at 6)
    assert round_keep(keep[:1], scores[:1], 5)[0].nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 4]


def test_round_keep_by_one_is_identity():
    model = randomized("vgg16", seed=9)
    keep = draw_mask(channel_scores(model), 0.5).per_layer()
    assert all(torch.equal(r, k) for r, k in zip(round_keep(keep, channel_scores(model), 1), keep))
    with pytest.raises(ValueError, match="multiple of 1 or more"):
        round_keep(keep, channel_scores(model), 0)


@pytest.mark.parametrize("name", ["vgg16", "preresnet"])
def test_rounded_pruned_network_trains_and_equals_switched_off(name):
    model = randomized(name, seed=10)
    scores = channel_scores(model)
    keep = round_keep(draw_mask(scores, 0.6).per_layer(), scores, 8)
    pruned = prune_channels(model, keep).eval()
    sizes = [bn.num_features for _, bn in model.prunable_bns()]
    assert all(k % 8 == 0 or k == n for k, n in zip(kept_channels(keep), sizes))
    assert count_params(pruned) < count_params(model)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), switch_off_channels(model, keep).eval()(x), atol=1e-5, rtol=1e-5)
    pruned.train()
    nn.functional.cross_entropy(pruned(x), torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None for p in pruned.parameters() if p.requires_grad)


def test_retrain_cuts_the_rounded_network_and_says_what_rounding_added(tmp_path):
    cfg = tiny_config(tmp_path, search={"ratios": [0.5], "eps": 0.9, "queue_length": 2, "round_channels": 8},
                      train={"epochs": 3})
    summary = eb_train(cfg, prepare_run_dir(cfg))
    row = summary["tickets"]["p50"]
    ticket = checkpoint.load(tmp_path / "run" / "tickets" / "p50.pt")
    trained = load_model(tmp_path / "run" / "retrain" / "p50" / "model.pt")
    channels = [bn.num_features for _, bn in trained.prunable_bns()]
    assert channels == row["kept_per_layer"] and sum(channels) == row["channels_kept"]
    assert all(k % 8 == 0 or k == n for k, n in zip(channels, ticket["dense_channels"]))
    assert row["channels_rounded_added"] == sum(channels) - sum(ticket["kept_channels"]) > 0
    assert [int(k.sum()) for k in ticket["keep"]] == ticket["kept_channels"]  # the EB mask itself is unchanged
    assert row["round_channels"] == 8 and count_params(trained) == row["params_pruned"]
