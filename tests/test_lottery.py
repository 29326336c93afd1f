"""The lottery-ticket experiment: pruning strategies, analyses, the rounds on disk, resume, the CLI."""
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ebtrain import checkpoint
from ebtrain.cli import main
from ebtrain.config import LotteryConfig
from ebtrain.data import load_data
from ebtrain.earlybird import channel_scores, draw_mask
from ebtrain.errors import UserError
from ebtrain.lottery import run_lottery
from ebtrain.lottery.analyses import eb_overlap, expected_jaccard, mask_overlap
from ebtrain.lottery.experiment import _members, initial_state
from ebtrain.lottery.masks import prunable_weights, random_masks
from ebtrain.lottery.population import Member, Population, train_members
from ebtrain.lottery.pruning import ChannelPruning, WeightPruning
from ebtrain.models import build_model
from ebtrain.report import format_rows, lottery_rows, run_rows
from ebtrain.rundir import prepare_run_dir

from conftest import lottery_config

pytestmark = pytest.mark.usefixtures("one_thread")


def random_state(model, generator):
    return {name: torch.randn(t.shape, generator=generator) for name, t in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["lenet300_100", "conv2"])
def test_layerwise_sparsity_after_k_rounds_is_compounded_rate(arch):
    model = build_model(arch, in_channels=1, image_size=8, width=0.25)
    pruning = WeightPruning(model, LotteryConfig(rate=0.2, conv_rate=0.15))
    kinds = prunable_weights(model)
    assert list(kinds.values()).count("output") == 1 and ("conv" in kinds.values()) == (arch == "conv2")
    expected_rate = {"conv": 0.15, "fc": 0.2, "output": 0.1}
    generator = torch.Generator().manual_seed(0)
    masks = pruning.dense()
    for k in range(1, 8):
        new = pruning.prune(random_state(model, generator), masks, k)  # fresh "trained" weights every round
        for name, kind in kinds.items():
            assert not (new[name] & ~masks[name]).any(), "a pruned weight came back"
            n = new[name].numel()
            target = (1 - expected_rate[kind]) ** k
            assert abs(int(new[name].sum()) - target * n) <= 0.5 + 1e-9, (name, k)
        masks = new


def test_magnitude_pruning_keeps_the_largest_weights():
    model = build_model("lenet300_100", in_channels=1, image_size=8, width=0.25)
    pruning = WeightPruning(model, LotteryConfig(rate=0.5))
    state = random_state(model, torch.Generator().manual_seed(1))
    masks = pruning.prune(state, pruning.dense(), 1)
    for name, mask in masks.items():
        magnitude = state[name].abs()
        assert magnitude[mask].min() >= magnitude[~mask].max()


def test_global_pruning_hits_the_global_target():
    model = build_model("lenet300_100", in_channels=1, image_size=8, width=0.25)
    pruning = WeightPruning(model, LotteryConfig(rate=0.2, global_pruning=True))
    generator = torch.Generator().manual_seed(0)
    state = random_state(model, generator)
    state["layers.5.weight"] = state["layers.5.weight"].abs() + 10  # a layer of large weights keeps all
    masks = pruning.dense()
    total = sum(m.numel() for m in masks.values())
    for k in range(1, 5):
        masks = pruning.prune(state, masks, k)
        assert sum(int(m.sum()) for m in masks.values()) == round(total * 0.8 ** k)
    densities = {n: float(m.float().mean()) for n, m in masks.items()}
    assert densities["layers.5.weight"] == 1.0 and densities["layers.1.weight"] < 0.8 ** 4


def test_global_pruning_ranks_only_the_layers_it_prunes():
    # the paper's VGG-19 recipe: 20% of the conv weights per round, globally; the output layer (rate 0) keeps all,
    # even with the smallest weights of the network, which one ranking over every layer would take first
    model = build_model("vgg11", width=0.125)
    kinds = prunable_weights(model)
    [output] = [n for n, kind in kinds.items() if kind == "output"]
    pruning = WeightPruning(model, LotteryConfig(rate=0.2, global_pruning=True, output_rate=0.0))
    state = random_state(model, torch.Generator().manual_seed(0))
    state[output] = state[output] * 1e-6
    masks = pruning.dense()
    conv_total = sum(masks[n].numel() for n, kind in kinds.items() if kind == "conv")
    for k in (1, 2):
        masks = pruning.prune(state, masks, k)
        assert masks[output].all()
        assert sum(int(masks[n].sum()) for n, kind in kinds.items() if kind == "conv") == round(conv_total * 0.8 ** k)
    assert len({round(float(m.float().mean()), 2) for n, m in masks.items() if n != output}) > 1  # not layer-wise
    with pytest.raises(UserError, match="nothing would be pruned"):
        WeightPruning(model, LotteryConfig(rate=0.2, global_pruning=True, conv_rate=0.0, output_rate=0.0))


def test_mask_overlap_of_random_masks_is_the_expected_jaccard():
    assert expected_jaccard(0.5, 0.5) == pytest.approx(1 / 3) and expected_jaccard(1.0, 0.2) == pytest.approx(0.2)
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.rand(200, 500, generator=generator) < 0.3, "v": torch.rand(1000, generator=generator) < 0.6}
    overlap = mask_overlap({1: base, 2: random_masks(base, generator), 3: random_masks(base, generator)})
    for entry in [overlap["overall"], *overlap["layers"].values()]:
        assert entry["observed"] == pytest.approx(entry["random"], abs=0.01)
    same = mask_overlap({1: base, 2: base})
    density = float(base["w"].float().mean())
    assert same["overall"]["observed"] == 1.0
    assert same["layers"]["w"]["random"] == pytest.approx(density / (2 - density))


def test_experiment_writes_json_plots_events_and_resumes(tmp_path):
    cfg = lottery_config(tmp_path, lottery={"seeds": 2})
    run = prepare_run_dir(cfg)
    summary = run_lottery(cfg, run)
    on_disk = json.loads((run / "lottery.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2] and summary["batched"]
    assert list(summary["rounds"][0]["arms"]) == ["ticket"]
    assert list(summary["rounds"][1]["arms"]) == ["ticket", "reinit", "random-prune"]
    remaining = [r["remaining"] for r in summary["rounds"]]
    assert remaining[0] == 100 and remaining[0] > remaining[1] > remaining[2]
    layers = summary["rounds"][2]["layers"]  # percent kept per layer after 2 rounds: 0.8^2, output 0.9^2
    assert layers["layers.1.weight"] == pytest.approx(64, abs=0.5) and layers["layers.5.weight"] == pytest.approx(81, abs=1)
    stats = summary["rounds"][1]["arms"]["reinit"]["test_acc_early"]
    assert stats["min"] <= stats["mean"] <= stats["max"] and set(stats) == {"mean", "std", "min", "max"}
    assert 1 <= summary["rounds"][2]["arms"]["ticket"]["early_stop_iter"]["mean"] <= 12
    assert len(summary["mask_overlap"]) == 2 and len(summary["weight_movement"]) == 2
    movement = summary["weight_movement"][0]["overall"]
    assert movement["kept"] > 0 and movement["pruned"] > 0
    for name in ("lottery_accuracy.png", "lottery_early_stop.png"):
        assert (run / name).stat().st_size > 5000
    result = json.loads((run / "round01" / "result.json").read_text())
    assert len(result["records"]) == 6 and len(result["records"][0]["val_curve"]) == 3
    events = EventAccumulator(str(run))
    events.Reload()
    assert [e.step for e in events.Scalars("ticket/test_acc_early")] == [0, 1, 2]
    assert [e.step for e in events.Scalars("reinit/early_stop_iter")] == [1, 2]
    rows = run_rows(run)  # what `ebtrain report RUN` shows
    assert rows == lottery_rows(run) and len(rows) == 7
    assert rows[0]["method"] == "dense" and rows[-1]["method"] == "IMP random-prune"
    assert rows[-1]["ratio"] == pytest.approx(1 - remaining[2] / 100, abs=1e-4)
    assert "IMP reinit" in format_rows(rows)
    # resuming a finished run trains nothing and rewrites the same results
    stamp = (run / "round02" / "result.json").stat().st_mtime_ns
    cfg.run.resume = True
    again = run_lottery(cfg, run)
    assert (run / "round02" / "result.json").stat().st_mtime_ns == stamp
    assert again["rounds"] == summary["rounds"]
    # a run killed during round 2 redoes that round only, with the same results
    (run / "round02" / "result.json").unlink()
    stamp = (run / "round01" / "result.json").stat().st_mtime_ns
    again = run_lottery(cfg, run)
    assert (run / "round01" / "result.json").stat().st_mtime_ns == stamp
    def measured(rounds):  # everything but the timings
        return [{arm: {k: v for k, v in m.items() if k != "seconds"} for arm, m in r["arms"].items()} for r in rounds]

    assert measured(again["rounds"]) == measured(summary["rounds"])
    events = EventAccumulator(str(run))
    events.Reload()
    assert [e.step for e in events.Scalars("ticket/test_acc_early")] == [0, 1, 2]


def test_reset_rewind_and_controls_start_where_they_should(tmp_path):
    cfg = lottery_config(tmp_path, lottery={"rounds": 1, "rewind_iter": 3, "iterations": 6, "eval_every": 3})
    run = prepare_run_dir(cfg)
    run_lottery(cfg, run)
    data = load_data(cfg.data, seed=1)
    model = build_model("lenet300_100", num_classes=4, in_channels=1, image_size=8, width=0.25)
    pruning = WeightPruning(model, cfg.lottery)
    members, tickets = _members(cfg, data, pruning, [1], 1, run)
    ticket, reinit, random_prune = members
    # the rewind point is exactly the dense network after 3 iterations
    _, [after3], _ = train_members(lambda: build_model(**model.arch), [Member(1, "ticket", initial_state(cfg, data, 1),
                                   pruning.param_masks(pruning.dense()))], data, cfg.train, torch.device("cpu"), 3, 3)
    for name, value in after3.items():
        assert torch.equal(ticket.state[name], value), name
    pop = Population(build_model(**model.arch), [ticket], torch.device("cpu"))
    for name, mask in tickets[1].items():
        assert torch.equal(pop.params[name][0][mask], after3[name][mask])
        assert not pop.params[name][0][~mask].any()
    assert reinit.masks == ticket.masks or all(torch.equal(reinit.masks[n], ticket.masks[n]) for n in ticket.masks)
    assert not torch.equal(reinit.state["layers.1.weight"], ticket.state["layers.1.weight"])
    for name, mask in tickets[1].items():
        assert int(random_prune.masks[name].sum()) == int(mask.sum())  # the ticket's per-layer sparsity
        assert not torch.equal(random_prune.masks[name], mask)
    # without rewinding, the ticket starts from the initialization
    cfg.lottery.rewind_iter = 0
    [ticket0, *_], _ = _members(cfg, data, pruning, [1], 1, run)
    for name, value in initial_state(cfg, data, 1).items():
        assert torch.equal(ticket0.state[name], value), name


def test_structured_rounds_use_channel_masks_and_compare_with_an_eb_ticket(tmp_path):
    cfg = lottery_config(tmp_path, model={"arch": "vgg11", "width": 0.125}, data={"channels": 3},
                         lottery={"structured": True, "one_shot": True, "rounds": 1, "rate": 0.3,
                                  "random_prune": False, "iterations": 4, "eval_every": 2},
                         train={"eval_batch_size": 256})  # one evaluation batch: fewer conv shapes to set up
    run = prepare_run_dir(cfg)
    summary = run_lottery(cfg, run)
    state = checkpoint.load(run / "round01" / "state.pt")
    dense = checkpoint.load(run / "round00" / "state.pt")["final"][1]
    model = build_model("vgg11", num_classes=4, in_channels=3, image_size=8, width=0.125)
    pruning = ChannelPruning(model, cfg.lottery)
    masks = state["masks"][1]
    assert list(masks) == pruning.layers and sum(int((~m).sum()) for m in masks.values()) == int(0.3 * sum(pruning.sizes))
    assert summary["rounds"][1]["remaining"] < 100
    for name, keep in masks.items():  # a pruned channel's BN weight and bias stayed zero through training
        assert not state["final"][1][f"{name}.weight"][~keep].any()
    # an EB ticket drawn from the same weights at the same ratio is the same mask
    model.load_state_dict(dense)
    ticket = {"arch": model.arch, "state_dict": dense}
    [row] = eb_overlap(ticket, pruning, {1: masks})
    assert row["jaccard"] == 1.0 and row["distance"] == 0.0 and row["random"] < 1.0
    assert torch.equal(draw_mask(channel_scores(model), 0.3).keep, torch.cat(list(masks.values())))


def test_cli_lottery_runs_and_rejects_bad_settings(tmp_path, capsys):
    flags = ["lottery", "--dataset", "synthetic", "--synthetic-size", "128", "--image-size", "8", "--channels", "1",
             "--num-classes", "4", "--arch", "lenet300_100", "--width", "0.25", "--optimizer", "adam", "--lr", "0.002",
             "--batch-size", "32", "--device", "cpu", "--progress", "off", "--iterations", "6", "--eval-every", "3",
             "--rounds", "1"]
    assert main([*flags, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "--val-size" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
    assert main([*flags, "--rate", "1.5", "--val-size", "32", "--out", str(tmp_path / "bad")]) == 2
    assert "--rate 1.5" in capsys.readouterr().err
    assert main([*flags, "--val-size", "32", "--no-random-prune", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "reinit" in out and "random-prune" not in out
    assert json.loads((tmp_path / "run" / "lottery.json").read_text())["arms"] == ["ticket", "reinit"]
