"""Tickets sized by FLOPs (--flops-targets) and the FLOPs-weighted L1 penalty (--sparsity-weight flops)."""
import pytest
import torch

from ebtrain import checkpoint
from ebtrain.channel_flops import ChannelFlops
from ebtrain.cli import main
from ebtrain.earlybird import EarlyBird, channel_scores, draw_flops_mask, draw_mask
from ebtrain.flops import measure_cost
from ebtrain.models import build_model
from ebtrain.pipeline import eb_train
from ebtrain.prune import prune_channels
from ebtrain.report import run_rows
from ebtrain.rundir import prepare_run_dir
from ebtrain.search import L1Sparsity, flops_scales

from conftest import TINY_FLAGS, tiny_config

SHAPE = (3, 16, 16)
FAMILIES = [("vgg11", {}), ("preresnet", {"depth": 20}), ("resnet20", {})]
# and the count for ResNet-50's bottlenecks (two prunable BNs a block) behind the ImageNet stem, narrower to stay quick
COUNTED = FAMILIES + [("resnet50_imagenet", {"width": 0.0625})]


def random_gammas(model, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, bn in model.prunable_bns():
            bn.weight.copy_(torch.full_like(bn.weight, 0.5) if ties
                            else torch.rand(bn.weight.shape, generator=g) * 2 - 1)
    return model


def measured(model, keep):
    """Forward FLOPs per image of the physically pruned network, as the cost report counts them."""
    return measure_cost(prune_channels(model, keep), SHAPE, 2).forward_flops_per_image


@pytest.mark.parametrize("arch,kw", COUNTED)
def test_counted_flops_equal_the_measured_flops_of_the_pruned_network(arch, kw):
    model = random_gammas(build_model(arch, image_size=16, **{"width": 0.25, **kw}))
    counter = ChannelFlops(model, SHAPE)
    assert counter.dense == measure_cost(model, SHAPE, 2).forward_flops_per_image
    for ratio in (0.2, 0.6, 0.9):
        mask = draw_mask(channel_scores(model), ratio)
        assert counter.flops(mask.kept_per_layer()) == measured(model, mask.per_layer())


@pytest.mark.parametrize("arch,kw", FAMILIES)
@pytest.mark.parametrize("target", [0.5, 0.25])
@pytest.mark.parametrize("ties", [False, True])
def test_flops_mask_fits_the_target_and_no_pruned_channel_can_be_added_back(arch, kw, target, ties):
    model = random_gammas(build_model(arch, width=0.25, image_size=16, **kw), ties=ties)
    counter = ChannelFlops(model, SHAPE)
    mask = draw_flops_mask(channel_scores(model), target, counter)
    assert measured(model, mask.per_layer()) / counter.dense <= target
    assert all(k >= 1 for k in mask.kept_per_layer())
    pruned = (~mask.keep).nonzero().squeeze(1).tolist()
    assert pruned
    for channel in pruned:  # exactly, with the counter, for every pruned channel
        keep = mask.keep.clone()
        keep[channel] = True
        kept = [int(k.sum()) for k in keep.split(list(mask.sizes))]
        assert counter.flops(kept) > target * counter.dense
    for channel in pruned[:: max(1, len(pruned) // 5)]:  # and on the physically pruned network
        keep = mask.keep.clone()
        keep[channel] = True
        assert measured(model, list(keep.split(list(mask.sizes)))) / counter.dense > target


def test_flops_mask_keeps_the_ranking_prefix_that_fits():
    model = random_gammas(build_model("vgg11", width=0.25, image_size=16), seed=3)
    counter = ChannelFlops(model, SHAPE)
    scores = channel_scores(model)
    mask = draw_flops_mask(scores, 0.3, counter)
    flat = torch.cat(scores).double()
    order = torch.sort(flat, stable=True).indices.flip(0)  # highest-ranked first, draw_mask's ties
    first_skipped = next(i for i, c in enumerate(order.tolist()) if not mask.keep[c])
    assert first_skipped > 0 and mask.keep[order[:first_skipped]].all()


def test_flops_mask_validates_its_inputs():
    model = build_model("vgg11", width=0.25, image_size=16)
    counter = ChannelFlops(model, SHAPE)
    with pytest.raises(ValueError, match="FLOPs target"):
        draw_flops_mask(channel_scores(model), 1.0, counter)
    with pytest.raises(ValueError, match="channels"):
        draw_flops_mask(channel_scores(model)[:-1], 0.5, counter)


def test_detector_tracks_flops_targets_beside_ratios_and_restores_them():
    model = random_gammas(build_model("vgg11", width=0.25, image_size=16))
    detector = EarlyBird(model, ratios=[0.3], flops_targets=[0.5], eps=0.5, queue_length=2, input_shape=SHAPE)
    assert detector.keys == [0.3, "f50"] and detector.name("f50") == "f50" and detector.name(0.3) == "p30"
    tickets = [t for epoch in range(3) for t in detector.step(epoch)]
    assert {t.name for t in tickets} == {"p30", "f50"} and detector.done
    f50 = detector.emerged["f50"]
    assert f50.flops_target == 0.5 and f50.flops_fraction <= 0.5 and f50.key == "f50"
    assert f50.ratio == f50.mask.num_pruned / f50.mask.keep.numel()
    assert detector.emerged[0.3].flops_fraction is not None
    assert detector.summary()["flops_targets"]["0.5"]["name"] == "f50"
    assert detector.queue("p30") == detector.queue(0.3) and detector.masks("p30") == detector.masks(0.3)

    again = EarlyBird(model, ratios=[0.3], flops_targets=[0.5], eps=0.5, queue_length=2, input_shape=SHAPE)
    again.load_state_dict(detector.state_dict())
    assert again.summary() == detector.summary()
    other = EarlyBird(model, ratios=[0.3], eps=0.5, queue_length=2)
    with pytest.raises(ValueError, match="flops_targets"):
        other.load_state_dict(detector.state_dict())


def test_detector_api_without_ratios_and_its_errors():
    model = build_model("vgg11", width=0.25, image_size=16)
    only = EarlyBird(model, ratios=[], flops_targets=[0.25], input_shape=SHAPE)
    assert only.keys == ["f25"] and only.pending == ["f25"]
    with pytest.raises(ValueError, match="count FLOPs"):
        EarlyBird(model, flops_targets=[0.5])
    with pytest.raises(ValueError, match="outside the allowed range"):
        EarlyBird(model, flops_targets=[1.5], input_shape=SHAPE)
    with pytest.raises(ValueError, match="share ticket names"):
        EarlyBird(model, flops_targets=[0.5, 0.5000001], input_shape=SHAPE)
    with pytest.raises(ValueError, match="at least one"):
        EarlyBird(model, ratios=[])


def test_flops_scales_are_each_channels_cost_with_mean_one():
    model = build_model("vgg11", width=0.25, image_size=16)  # cfg 16 M 32 M 64 64 M 128 128 M 128 128
    counter = ChannelFlops(model, SHAPE)
    costs = counter.channel_costs()
    # the first conv's channel: its 16x16 output map from 3 inputs, plus the second conv's 8x8 input slice
    assert costs[0] == 2 * 9 * 3 * 16 * 16 + 2 * 9 * 32 * 8 * 8
    # the last conv's channel: its 1x1 map from 128 inputs, plus the classifier's input
    assert costs[-1] == 2 * 9 * 128 * 1 * 1 + 2 * 10
    scales = flops_scales(counter)
    channels = counter.sizes
    assert sum(s * n for s, n in zip(scales, channels)) / sum(channels) == pytest.approx(1.0)
    assert [s / scales[0] for s in scales] == pytest.approx([c / costs[0] for c in costs])


def test_weighted_penalty_gradient_equals_its_formula():
    torch.manual_seed(0)
    model = random_gammas(build_model("vgg11", width=0.25, image_size=16))
    for _, bn in model.prunable_bns():
        bn.weight.grad = torch.randn_like(bn.weight)
    before = [bn.weight.grad.clone() for _, bn in model.prunable_bns()]
    scales = flops_scales(ChannelFlops(model, SHAPE))
    L1Sparsity(model, 1e-3, scales).after_backward(None)
    for (_, bn), b, scale in zip(model.prunable_bns(), before, scales):
        assert torch.allclose(bn.weight.grad, b + 1e-3 * scale * torch.sign(bn.weight.detach()), atol=1e-9)
    uniform = [bn.weight.grad.clone() for _, bn in model.prunable_bns()]
    L1Sparsity(model, 1e-3).after_backward(None)  # the paper's penalty is unchanged
    for (_, bn), b in zip(model.prunable_bns(), uniform):
        assert torch.allclose(bn.weight.grad, b + 1e-3 * torch.sign(bn.weight.detach()), atol=1e-9)


def test_search_draws_flops_tickets_retrains_them_and_reports_both_fractions(tmp_path):
    cfg = tiny_config(tmp_path, search={"ratios": [0.5], "flops_targets": [0.5], "eps": 0.9, "queue_length": 2,
                                        "sparsity_weight": "flops"})
    run = prepare_run_dir(cfg)
    summary = eb_train(cfg, run)
    assert set(summary["tickets"]) == {"p50", "f50"}
    ticket = checkpoint.load(run / "tickets" / "f50.pt")
    assert ticket["flops_target"] == 0.5 and ticket["flops_fraction"] <= 0.5
    assert (run / "retrain" / "f50" / "result.json").is_file() and (run / "search" / "distance_f50.png").is_file()
    f50 = summary["tickets"]["f50"]
    assert f50["ticket"] == "f50" and f50["flops_fraction"] == pytest.approx(ticket["flops_fraction"])
    rows = {r["ticket"]: r for r in run_rows(run)}
    assert rows["f50"]["flops_fraction"] <= 0.5 and rows["p50"]["channels_fraction"] == 0.5
    assert rows["f50"]["channels"] == f"{f50['channels_kept']}/{f50['channels_total']}"
    metrics = [line for line in (run / "search" / "metrics.jsonl").read_text().splitlines()]
    assert '"eb_f50_distance"' in metrics[-1]


def test_cli_flops_targets_without_ratios_and_clear_errors(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--ratios", "--flops-targets", "0.4", "--eps", "0.9", "--queue-length", "2", "--epochs", "3",
                 "--no-retrain", "--out", str(out), *TINY_FLAGS]) == 0
    assert (out / "tickets" / "f40.pt").is_file()
    for flags, message in ((["--ratios"], "--ratios is empty and no --flops-targets"),
                           (["--flops-targets", "0.5", "1"], "--flops-targets 0.5 1: each must lie in (0, 1)"),
                           (["--flops-targets", "0.5", "0.5000001"], "share a ticket file: f50, f50")):
        capsys.readouterr()
        assert main([*flags, "--out", str(tmp_path / "bad"), *TINY_FLAGS]) != 0
        assert message in capsys.readouterr().err
