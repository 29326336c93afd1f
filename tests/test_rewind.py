"""`--init rewind --rewind-epoch K` (late rewinding to the search's weights of epoch K) and `--init reinit`'s
own seed (`--reinit-seed`): what the search saves, where a retrain starts, and the errors."""
import json

import pytest
import torch

from ebtrain import checkpoint, rundir
from ebtrain.config import apply_overrides
from ebtrain.data import derived_seed, load_data
from ebtrain.errors import UserError
from ebtrain.models import build_model
from ebtrain.pipeline import eb_train, reinit_seed, retrain_start, retrain_ticket
from ebtrain.prune import prune_channels
from ebtrain.report import method_label
from ebtrain.rundir import prepare_run_dir
from ebtrain.tickets import load_ticket, pruned_from_ticket
from ebtrain.train import learning_rate, resolve_device
from ebtrain.validate import validate

from conftest import TINY_FLAGS, run_cli, tiny_config

# eps 0.9 with a queue of 2: the ticket emerges at epoch 2; the learning rate drops tenfold after epoch 1
SEARCH = {"ratios": [0.5], "eps": 0.9, "queue_length": 2}
TRAIN = {"epochs": 4, "milestones": [1]}


def _with(cfg, **search):
    return apply_overrides(cfg, {"search": search})


def _kept_bn_slices_match(pruned, dense, keep) -> bool:
    """Each prunable BN of `pruned` holds the kept channels of `dense`'s (weight, bias, running stats)."""
    pairs = zip(pruned.prunable_bns(), dense.prunable_bns(), keep)
    return all(torch.equal(getattr(p, name), getattr(d, name)[k])
               for (_, p), (_, d), k in pairs for name in ("weight", "bias", "running_mean", "running_var"))


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A run searched with --rewind-epoch 1 and not retrained: its config and run folder."""
    tmp = tmp_path_factory.mktemp("rewind")
    cfg = tiny_config(tmp, search={**SEARCH, "retrain": False, "rewind_epoch": 1}, train=TRAIN)
    run = prepare_run_dir(cfg)
    summary = eb_train(cfg, run)
    assert summary["search"]["epochs_trained"] == 2
    return cfg, run


def test_search_saves_the_weights_of_the_rewind_epoch(searched):
    cfg, run = searched
    assert rundir.rewind_file(run, 1) == run / "rewind1.pt" and rundir.rewind_file(run, 0) == run / "init.pt"
    at_1, at_0 = checkpoint.load(run / "rewind1.pt"), checkpoint.load(run / "init.pt")
    at_2 = load_ticket(run / "tickets" / "p50.pt")["state_dict"]  # the ticket holds the weights of epoch 2
    assert at_1.keys() == at_0.keys() == at_2.keys()
    assert not torch.equal(at_1["features.0.weight"], at_0["features.0.weight"])
    assert not torch.equal(at_1["features.0.weight"], at_2["features.0.weight"])
    assert not (run / "rewind2.pt").exists()


def test_rewound_network_holds_the_kept_weights_of_epoch_k(searched):
    cfg, run = searched
    path = run / "tickets" / "p50.pt"
    ticket = load_ticket(path)
    dense_k = build_model(**ticket["arch"])
    dense_k.load_state_dict(checkpoint.load(run / "rewind1.pt"))
    pruned, start, setting = retrain_start(cfg, ticket, path, "rewind")
    assert (start, setting) == (1, {"rewind_epoch": 1})
    assert _kept_bn_slices_match(pruned, dense_k, ticket["keep"])
    assert all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(),
                                                 prune_channels(dense_k, ticket["keep"]).state_dict().values()))
    eb, eb_start, _ = retrain_start(cfg, ticket, path, "eb")  # not the EB weights
    assert eb_start == 2 and not _kept_bn_slices_match(eb, dense_k, ticket["keep"])
    # the initialization is epoch 0 (RUN/init.pt)
    dense_0 = build_model(**ticket["arch"])
    dense_0.load_state_dict(checkpoint.load(run / "init.pt"))
    at_0, start, setting = retrain_start(_with(cfg, rewind_epoch=0), ticket, path, "rewind")
    assert (start, setting) == (0, {"rewind_epoch": 0}) and _kept_bn_slices_match(at_0, dense_0, ticket["keep"])


def test_rewound_retrain_continues_the_schedule_from_epoch_k(searched):
    cfg, run = searched
    out = rundir.retrain_dir(run, 0.5, "rewind", 1)
    assert out == run / "retrain" / "p50-rewind1"
    data = load_data(cfg.data, seed=cfg.train.seed)
    result = retrain_ticket(_with(cfg, init="rewind"), run / "tickets" / "p50.pt", out, data, resolve_device("cpu"),
                            "rewind")
    assert (result["first_epoch"], result["last_epoch"], result["epochs_trained"]) == (2, 4, 3)
    assert result["init"] == "rewind" and result["rewind_epoch"] == 1 and result["eb_epoch"] == 2
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["epoch"] == 2 and first["lr"] == pytest.approx(learning_rate(cfg.train, 1)) == pytest.approx(0.005)
    assert method_label(result) == "EB rewind (epoch 1)"
    assert method_label({**result, "rewind_epoch": 0}) == "EB rewind"


def test_rewind_errors_say_why(searched):
    cfg, run = searched
    path = run / "tickets" / "p50.pt"
    ticket = load_ticket(path)
    with pytest.raises(UserError, match="the ticket emerged at epoch 2, and rewinding goes back"):
        retrain_start(_with(cfg, rewind_epoch=3), ticket, path, "rewind")
    # epoch 2 is allowed, but this search saved epoch 1 only
    with pytest.raises(UserError, match=r"needs '.*rewind2\.pt': the search ran with --rewind-epoch 1"):
        retrain_start(_with(cfg, rewind_epoch=2), ticket, path, "rewind")
    with pytest.raises(UserError, match="--rewind-epoch 4: must be below --epochs 4"):
        validate(_with(cfg, rewind_epoch=4))
    with pytest.raises(UserError, match="--rewind-epoch 3: the search stops by --max-search-epochs 2"):
        validate(_with(cfg, rewind_epoch=3, max_search_epochs=2))
    with pytest.raises(UserError, match="--rewind-epoch -1: must be 0 or more"):
        validate(_with(cfg, rewind_epoch=-1))


def test_eb_train_skips_a_ticket_older_than_the_rewind_epoch(tmp_path, capsys):
    cfg = tiny_config(tmp_path, search={**SEARCH, "init": "rewind", "rewind_epoch": 3}, train=TRAIN)
    summary = eb_train(cfg, prepare_run_dir(cfg))
    assert summary["tickets"] == {}
    assert "the ticket p50 emerged at epoch 2, before --rewind-epoch 3" in capsys.readouterr().err


def test_rewind_weights_survive_a_resumed_search(tmp_path, searched):
    _, straight = searched
    search = {**SEARCH, "retrain": False, "rewind_epoch": 1}
    killed = tiny_config(tmp_path, search={**search, "max_search_epochs": 1}, train=TRAIN)
    run = prepare_run_dir(killed)
    eb_train(killed, run)
    # pretend the process died after epoch 1's checkpoint: drop the finish marks and resume
    (run / "search" / "result.json").unlink()
    (run / "summary.json").unlink()
    resumed = eb_train(tiny_config(tmp_path, search=search, train=TRAIN, run={"resume": True}), run)
    assert resumed["search"]["epochs_trained"] == 2
    a, b = checkpoint.load(straight / "rewind1.pt"), checkpoint.load(run / "rewind1.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reinit_has_a_seed_of_its_own(searched):
    cfg, run = searched
    path = run / "tickets" / "p50.pt"
    ticket = load_ticket(path)
    assert cfg.search.reinit_seed == -1 and reinit_seed(cfg) == derived_seed("reinit", cfg.train.seed, bits=32)
    assert reinit_seed(cfg) != cfg.train.seed and reinit_seed(_with(cfg, reinit_seed=7)) == 7
    dense_0 = build_model(**ticket["arch"])
    dense_0.load_state_dict(checkpoint.load(run / "init.pt"))
    fresh, start, setting = retrain_start(cfg, ticket, path, "reinit")
    assert start == 0 and setting == {"reinit_seed": reinit_seed(cfg), "reinit_seed_derived": True}
    # not the dense initialization's kept slices, whatever the shapes give: the first conv differs
    kept_init = prune_channels(dense_0, ticket["keep"])
    assert fresh.state_dict().keys() == kept_init.state_dict().keys()
    assert not torch.equal(fresh.state_dict()["features.0.weight"], kept_init.state_dict()["features.0.weight"])
    again, _, _ = retrain_start(cfg, ticket, path, "reinit")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), again.state_dict().values()))
    other, _, setting = retrain_start(_with(cfg, reinit_seed=7), ticket, path, "reinit")
    assert setting == {"reinit_seed": 7, "reinit_seed_derived": False}
    assert not torch.equal(other.state_dict()["features.0.weight"], fresh.state_dict()["features.0.weight"])
    assert method_label({"init": "reinit", **setting}) == "EB re-init (seed 7)"
    assert method_label({"init": "reinit", "reinit_seed": 123, "reinit_seed_derived": True}) == "EB re-init"
    assert pruned_from_ticket(ticket)[1].state_dict().keys() == fresh.state_dict().keys()


def test_retrain_folders_name_the_setting(tmp_path):
    run = tmp_path
    assert rundir.retrain_dir(run, 0.3, "rewind") == run / "retrain" / "p30-rewind"  # old runs still load
    assert rundir.retrain_dir(run, 0.3, "rewind", 5) == run / "retrain" / "p30-rewind5"
    assert rundir.retrain_dir(run, 0.3, "reinit") == run / "retrain" / "p30-reinit"
    assert rundir.retrain_dir(run, 0.3, "reinit", reinit_seed=7) == run / "retrain" / "p30-reinit-seed7"
    assert rundir.retrain_dir(run, 0.3, "eb", 5, 7) == run / "retrain" / "p30"


def test_cli_retrain_rewinds_to_an_epoch(tmp_path):
    out = tmp_path / "run"
    args = [*TINY_FLAGS, "--epochs", "4", "--milestones", "1", "--ratios", "0.5", "--eps", "0.9",
            "--queue-length", "2"]
    done = run_cli("search", *args, "--out", str(out), "--no-retrain", "--rewind-epoch", "1")
    assert done.returncode == 0, done.stderr
    ticket = str(out / "tickets" / "p50.pt")
    again = run_cli("retrain", ticket, "--init", "rewind", "--rewind-epoch", "1")
    assert again.returncode == 0, again.stderr
    result = json.loads((out / "retrain" / "p50-rewind1" / "result.json").read_text())
    assert (result["rewind_epoch"], result["first_epoch"]) == (1, 2)
    refused = run_cli("retrain", ticket, "--init", "rewind", "--rewind-epoch", "2")
    assert refused.returncode == 2 and "the search ran with --rewind-epoch 1" in refused.stderr
    assert "late rewinding" in " ".join(run_cli("retrain", "--help").stdout.split())
