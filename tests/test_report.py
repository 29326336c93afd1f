import csv
import io
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ebtrain.cli import main
from ebtrain.data import load_data
from ebtrain.flops import baseline_cost, detector_ops, run_cost
from ebtrain.pipeline import dense_job, eb_train, retrain_ticket
from ebtrain.report import summary_rows, ticket_agreement_rows
from ebtrain.rundir import prepare_run_dir
from ebtrain.train import resolve_device

from conftest import tiny_config


def phase(flops: int, paper: int, seconds: float, **extra) -> dict:
    """The fields of a phase cost (`CostMeter.finish`) that the run-level arithmetic reads."""
    return {"flops": flops, "flops_paper": paper, "seconds": seconds, **extra}


def result(acc: float, epochs: int, seconds: float, **extra) -> dict:
    return {"final_test_acc": acc, "best_test_acc": acc, "epochs_trained": epochs, "seconds": seconds, **extra}


SEARCH_COST = phase(100, 120, 2.0, detector_ops=2, images_per_epoch=10, step_flops=40, batch_size=8,
                    forward_flops_per_image=2, seconds_per_epoch=[0.25, 0.5, 0.5, 0.75, 0.0])


def ticket(ratio: float, init: str, flops: int, paper: int) -> dict:
    return result(0.9, 6, 3.0, ratio=ratio, init=init, eb_epoch=4, channels_kept=70, channels_total=100,
                  params_pruned=500, cost=phase(flops, paper, 3.0))


def test_savings_arithmetic_on_a_constructed_summary():
    summary = {"epochs": 10, "search": result(0.5, 4, 2.0, cost=SEARCH_COST),
               "baseline": result(0.92, 10, 9.0, params=1000, cost=phase(1000, 1200, 9.0)),
               "tickets": {"p30": ticket(0.3, "eb", 150, 180), "p50": ticket(0.5, "eb", 98, 118)}}
    cost = run_cost(SEARCH_COST, summary["tickets"], summary["baseline"]["cost"], 10)
    # EB-Train for a ticket = search (training + detector) + that ticket's retrain
    assert cost["tickets"]["p30"]["flops"] == 100 + 2 + 150
    assert cost["tickets"]["p30"]["savings"] == pytest.approx(1000 / 252)
    assert cost["tickets"]["p50"]["savings_paper"] == pytest.approx(1200 / (120 + 2 + 118))
    assert cost["total"] == {"flops": 102 + 150 + 98, "flops_paper": 122 + 180 + 118}
    assert cost["search"]["detector_share"] == pytest.approx(0.02)
    # alone: the search's first 4 epochs (the EB epoch), 40 images, and 5 draws of one ratio's mask
    detector = detector_ops(100, 1, 5)
    assert cost["tickets"]["p30"]["alone"] == {
        "flops": 40 * 40 // 8 + detector + 150, "flops_paper": 3 * 2 * 40 + detector + 180,
        "savings": pytest.approx(1000 / (200 + detector + 150)),
        "savings_paper": pytest.approx(1200 / (240 + detector + 180)), "seconds": 2.0 + 3.0}

    rows = summary_rows(summary, "r")
    assert [(r["method"], r["ratio"]) for r in rows] == [("dense", None), ("EB-Train", 0.3), ("EB-Train", 0.5)]
    assert (rows[0]["train_flops"], rows[0]["savings"]) == (1000, 1.0)
    assert (rows[1]["train_flops"], rows[1]["savings"], rows[1]["savings_paper"]) == \
        (252, round(1000 / 252, 3), round(1200 / 302, 3))
    assert rows[1]["seconds"] == 2.0 + 3.0 and rows[1]["final_acc"] == 90.0
    assert (rows[1]["train_flops_alone"], rows[1]["savings_alone"], rows[1]["seconds_alone"]) == \
        (200 + detector + 150, round(1000 / (350 + detector), 3), 5.0)

    # without a trained baseline: the dense per-image cost x the images of the full schedule
    assert baseline_cost(SEARCH_COST, None, 10) == {"flops": 40 * 100 // 8, "flops_paper": 3 * 2 * 100,
                                                    "measured": False, "seconds": None}
    del summary["baseline"]
    rows = summary_rows(summary, "r")
    assert rows[0]["method"] == "EB-Train" and rows[0]["savings"] == round(500 / 252, 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two small real runs: EB-Train with a baseline and a re-init retrain of its ticket, and `train`."""
    root = tmp_path_factory.mktemp("runs")
    cfg = tiny_config(root / "eb", search={"ratios": [0.5], "eps": 0.9, "queue_length": 2, "baseline": True})
    eb = prepare_run_dir(cfg)
    data = load_data(cfg.data, seed=cfg.train.seed)
    summary = eb_train(cfg, eb, data)
    retrain_ticket(cfg, eb / "tickets" / "p50.pt", eb / "retrain" / "p50-reinit", data, resolve_device("cpu"), "reinit")
    dense_cfg = tiny_config(root / "dense", train={"epochs": 2})
    dense = prepare_run_dir(dense_cfg)
    dense_job(dense_cfg, dense, data)
    return eb, dense, summary


def report(capsys, *args: str) -> str:
    assert main(["report", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_run_summary_records_the_cost_of_every_phase(runs):
    eb, _, summary = runs
    search, retrain, dense = (summary["search"]["cost"], summary["tickets"]["p50"]["cost"],
                              summary["baseline"]["cost"])
    # 256 images an epoch (batches of 32): FLOPs = images seen x measured step FLOPs / batch
    assert search["images"] == 256 * summary["search"]["epochs_trained"] and search["batch_size"] == 32
    assert search["flops"] == search["step_flops"] * search["images"] // 32
    assert retrain["images"] == 256 * summary["tickets"]["p50"]["epochs_trained"]
    assert retrain["train_flops_per_image"] < search["train_flops_per_image"]
    assert retrain["start_flops"] == search["flops"] + search["detector_ops"]
    # the measured baseline equals the dense step cost x the schedule
    assert dense["flops"] == baseline_cost(search, None, 4)["flops"] == summary["cost"]["baseline"]["flops"]
    assert len(dense["seconds_per_epoch"]) == 4
    assert summary["cost"]["search"]["detector_share"] < 1e-3
    assert summary["cost"]["tickets"]["p50"]["savings"] > 1

    events = EventAccumulator(str(eb / "search"))
    events.Reload()
    assert [e.value for e in events.Scalars("cost/cumulative_flops")] == \
        pytest.approx([search["flops"] / 2, search["flops"]])
    curve = EventAccumulator(str(eb / "retrain" / "p50" / "flops"))
    curve.Reload()
    steps = [e.step for e in curve.Scalars("test/acc_vs_flops")]
    # the retrain's curve continues from the search's total, in MFLOPs
    assert steps == [round((retrain["start_flops"] + k * retrain["flops"] / 2) / 1e6) for k in (1, 2)]


def test_report_has_a_row_per_method_and_ratio_in_every_format(runs, capsys, tmp_path):
    eb, dense, summary = runs
    expected = [(eb.name, "dense", None), (eb.name, "EB-Train", 0.5), (eb.name, "EB re-init", 0.5),
                (dense.name, "dense", None)]

    rows = json.loads(report(capsys, eb, dense, "--format", "json"))
    assert [(r["run"], r["method"], r["ratio"]) for r in rows] == expected
    assert rows[1]["train_flops"] == summary["cost"]["tickets"]["p50"]["flops"]
    assert rows[1]["savings"] == round(summary["cost"]["tickets"]["p50"]["savings"], 3)
    assert rows[2]["train_epochs"] == 4 and rows[2]["train_flops"] > rows[1]["train_flops"]
    assert rows[3]["train_flops"] == pytest.approx(rows[0]["train_flops"] / 2, rel=1e-9)  # 2 epochs, not 4

    table = list(csv.DictReader(io.StringIO(report(capsys, eb, dense, "--format", "csv"))))
    assert [(r["run"], r["method"]) for r in table] == [(run, method) for run, method, _ in expected]
    assert int(table[1]["train_flops"]) == rows[1]["train_flops"]

    text = report(capsys, eb, dense).splitlines()
    # one unit for the table, the largest that the largest figure (the 1.3 GFLOPs baseline) fills
    assert 1e9 < rows[0]["train_flops"] < 1e12
    assert "train_GFLOPs" in text[0].split() and "savings_paper" in text[0].split()
    assert [line.split()[1] for line in text[1:]] == ["dense", "EB-Train", "EB", "dense"]
    gflops = f"{rows[1]['train_flops'] / 1e9:.2f}"
    assert gflops in text[2].split() and f"{rows[1]['savings']:.2f}x" in text[2].split()

    markdown = report(capsys, eb, dense, "--format", "markdown", "--plot", tmp_path / "acc.png").splitlines()
    assert markdown[1].startswith("|--") and len(markdown) == 2 + len(expected)
    assert "EB re-init" in markdown[4] and gflops in markdown[3]
    assert (tmp_path / "acc.png").stat().st_size > 5000


def test_report_of_a_folder_without_a_run_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no summary.json" in capsys.readouterr().err


def test_ticket_agreement_counts_the_channels_two_searches_choose_alike(tmp_path, capsys):
    from ebtrain.earlybird import ChannelMask, Ticket
    from ebtrain.models import build_model
    from ebtrain.rundir import ticket_file
    from ebtrain.tickets import save_ticket
    model = build_model("vgg11", width=0.125, image_size=8)
    sizes = tuple(bn.num_features for _, bn in model.prunable_bns())
    keep_a = torch.ones(sum(sizes), dtype=torch.bool)
    keep_a[::2] = False
    keep_b = keep_a.clone()
    keep_b[:4] = ~keep_b[:4]  # four channels of the first layer decided the other way
    for run, keep, epoch in (("a", keep_a, 3), ("b", keep_b, 5)):
        save_ticket(Ticket(0.5, epoch, ChannelMask(keep, sizes), []), model, ticket_file(tmp_path / run, 0.5))
    rows = ticket_agreement_rows(tmp_path / "a", tmp_path / "b")
    n = sum(sizes)
    both, either = int((keep_a & keep_b).sum()), int((keep_a | keep_b).sum())
    assert rows == [{"ratio": 0.5, "eb_epoch_a": 3, "eb_epoch_b": 5, "channels": n,
                     "agree": round(100 * (n - 4) / n, 2), "jaccard": round(100 * both / either, 2),
                     "layers_agree": [round(100 * (sizes[0] - 4) / sizes[0], 1)] + [100.0] * (len(sizes) - 1)}]
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--tickets"]) == 0
    out = capsys.readouterr().out
    assert f"{100 * (n - 4) / n:.2f}" in out and "EB epoch a" in out


def test_ticket_agreement_without_common_ratios_is_an_error(tmp_path, capsys):
    (tmp_path / "a" / "tickets").mkdir(parents=True)
    (tmp_path / "b" / "tickets").mkdir(parents=True)
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--tickets"]) == 2
    assert "no ticket ratio in common" in capsys.readouterr().err


def test_a_ratio_alone_costs_what_a_run_of_that_ratio_alone_spends(tmp_path):
    # p = 0.3 emerges at epoch 3, p = 0.5 at epoch 4 (eps 0.2): the two-ratio search trains 4 epochs,
    # the p = 0.3 run 3; the p = 0.3 ticket and its retrain are the same in both
    data = None
    summaries = {}
    for ratios in ([0.3, 0.5], [0.3]):
        cfg = tiny_config(tmp_path / str(len(ratios)), train={"epochs": 8},
                          search={"ratios": ratios, "eps": 0.2, "queue_length": 2})
        data = data or load_data(cfg.data, seed=cfg.train.seed)
        summaries[len(ratios)] = eb_train(cfg, prepare_run_dir(cfg), data)
    both, alone = summaries[2], summaries[1]
    assert (both["search"]["epochs_trained"], alone["search"]["epochs_trained"]) == (4, 3)
    p30 = both["cost"]["tickets"]["p30"]
    for convention in ("flops", "flops_paper"):
        assert p30["alone"][convention] == alone["cost"]["tickets"]["p30"][convention] < p30[convention]
    assert p30["alone"]["savings"] == pytest.approx(alone["cost"]["tickets"]["p30"]["savings"])
