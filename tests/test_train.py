import json

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ebtrain.data import BatchLoader, load_data
from ebtrain.train import Hook, Trainer, evaluate, evaluation_sums, learning_rate, new_model, warmup_factor

from conftest import tiny_config


def make_trainer(cfg, out_dir, end_epoch=None, **kwargs):
    data = load_data(cfg.data, seed=cfg.train.seed)
    return Trainer(new_model(cfg, data, cfg.train.seed), data, cfg.train, device=torch.device("cpu"), out_dir=out_dir, end_epoch=end_epoch,
                   **kwargs)


def test_learning_rate_follows_global_milestones(tiny):
    cfg = tiny.train
    cfg.epochs, cfg.milestones, cfg.lr = 40, [0.5, 0.75], 0.1
    assert [learning_rate(cfg, e) for e in (0, 19, 20, 29, 30, 39)] == \
        [0.1, 0.1, 0.1 * 0.1, 0.1 * 0.1, 0.1 * 0.1 * 0.1, 0.1 * 0.1 * 0.1]


def test_warmup_rises_linearly_over_its_steps_then_holds():
    assert [warmup_factor(4, t) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == warmup_factor(1, 0) == 1.0


class RecordRates(Hook):
    """The learning rate every step trains with."""

    def __init__(self):
        self.rates = []

    def after_backward(self, trainer):
        self.rates.append(float(trainer.optimizer.param_groups[0]["lr"]))


def test_trainer_warms_up_step_by_step_counting_steps_from_the_start_of_the_schedule(tmp_path):
    # 256 images at batch 32: 8 steps an epoch; --warmup-iter 12 reaches lr 0.05 in epoch 2, a milestone at epoch 2
    cfg = tiny_config(tmp_path, train={"epochs": 3, "warmup_iter": 12, "milestones": [2]})
    record = RecordRates()
    trainer = make_trainer(cfg, None, hooks=[record])
    trainer.fit()
    warm = [0.05 * min(1, (t + 1) / 12) for t in range(16)]
    assert record.rates == pytest.approx(warm + [0.005] * 8)
    assert [m["lr"] for m in trainer.history] == pytest.approx([0.05 * 8 / 12, 0.05, 0.005])  # each epoch's last step
    # a phase that starts at epoch 1 (a retrain) is at global step 8 of the warmup
    record = RecordRates()
    make_trainer(cfg, None, end_epoch=2, start_epoch=1, hooks=[record]).fit()
    assert record.rates == pytest.approx(warm[8:])


def test_the_compiled_update_takes_the_rate_as_a_tensor_from_any_checkpoint(tmp_path):
    # a checkpoint holds the rate as the run that wrote it did: a float (eager, or older ebtrain) or a tensor
    for mode, old in (("on", 0.1), ("on", torch.tensor(0.1)), ("off", torch.tensor(0.1)), ("off", 0.1)):
        trainer = make_trainer(tiny_config(tmp_path, train={"compile": mode}), None)  # compiles only when called
        state = trainer.optimizer.state_dict()
        state["param_groups"][0]["lr"] = old
        trainer.optimizer.load_state_dict(state)
        trainer._set_lr(0.02)
        rate = trainer.optimizer.param_groups[0]["lr"]
        assert isinstance(rate, torch.Tensor) == (mode == "on") and float(rate) == pytest.approx(0.02)


def test_evaluation_sums_keep_one_sum_per_network_that_sees_the_batch(tiny):
    data = load_data(tiny.data, seed=1)
    loader = BatchLoader(data.test, 100, mean=data.mean, std=data.std)
    models = [new_model(tiny, data, seed).eval() for seed in (1, 2)]
    loss, correct = evaluation_sums(lambda x: torch.stack([m(x) for m in models]), loader)
    assert loss.shape == correct.shape == (2,)
    for k, model in enumerate(models):
        with torch.no_grad():
            want = sum(float(F.cross_entropy(model(xb), yb, reduction="sum")) for xb, yb in loader)
        assert float(loss[k]) == pytest.approx(want, rel=1e-5)
        assert evaluate(model, loader) == pytest.approx((float(loss[k]) / loader.num_samples,
                                                         int(correct[k]) / loader.num_samples))


def test_training_learns_and_writes_metrics(tmp_path):
    cfg = tiny_config(tmp_path)
    trainer = make_trainer(cfg, tmp_path / "out")
    result = trainer.fit()
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4]
    assert result["final_test_acc"] == lines[-1]["test_acc"]
    assert lines[-1]["test_acc"] > 0.6          # 4 classes: chance is 0.25
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]


def test_tensorboard_events_parse_with_expected_tags(tmp_path):
    cfg = tiny_config(tmp_path, train={"epochs": 2})
    trainer = make_trainer(cfg, tmp_path / "out")
    trainer.fit()
    trainer.monitor.close()
    acc = EventAccumulator(str(tmp_path / "out"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/acc", "test/loss", "test/acc", "lr"} <= tags
    assert [e.step for e in acc.Scalars("test/acc")] == [1, 2]


@pytest.mark.parametrize("warmup", [0, 12])  # 12: the warmup goes on into the resumed epoch
def test_resume_gives_identical_weights(tmp_path, warmup):
    cfg = tiny_config(tmp_path, train={"epochs": 2, "warmup_iter": warmup})
    straight = make_trainer(cfg, tmp_path / "straight")
    straight.fit()
    # one epoch, then the process "dies" right after its checkpoint; a new trainer resumes
    make_trainer(cfg, tmp_path / "killed", end_epoch=1).fit()
    resumed = make_trainer(cfg, tmp_path / "killed")
    assert resumed.resume() and resumed.epoch == 1
    resumed.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert straight.optimizer.state_dict()["state"][0]["momentum_buffer"].equal(
        resumed.optimizer.state_dict()["state"][0]["momentum_buffer"])


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    cfg = tiny_config(tmp_path, train={"epochs": 3})
    make_trainer(cfg, tmp_path / "run", end_epoch=2).fit()
    path = tmp_path / "run" / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:1000])  # a copy cut short
    resumed = make_trainer(cfg, tmp_path / "run")
    assert resumed.resume()
    assert resumed.epoch == 1  # epoch 2's checkpoint was lost, epoch 1's is used
    assert "unreadable" in capsys.readouterr().err
    resumed.fit()
    straight = make_trainer(cfg, tmp_path / "straight")
    straight.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_compiled_step_trains_as_the_eager_step_does(tmp_path):
    # the whole step compiled (forward with loss, backward, the L1 hook and the optimizer) against eager;
    # 64 images: 2 steps of 32 an epoch, 2 epochs. The run without the hook shows that the hook acted inside the
    # update. The rate changes at every step (a warmup of 3 steps, then a milestone at epoch 1): the compiled
    # update takes it as a tensor, so a new rate does not compile it again.
    from ebtrain.search import L1Sparsity

    def train(mode: str, strength: float) -> tuple[dict, dict]:
        cfg = tiny_config(tmp_path, data={"synthetic_size": 64},
                          train={"epochs": 2, "compile": mode, "warmup_iter": 3, "milestones": [1]})
        trainer = make_trainer(cfg, None)
        trainer.hooks.append(L1Sparsity(trainer.model, strength))
        return trainer.fit(), trainer.model.state_dict()

    torch._dynamo.reset()  # the compiled functions of other tests' trainers would recompile for this one
    eager, eager_weights = train("off", 1.0)
    # one compilation of each function, and one again once the optimizer has state (momentum); a rate as a float
    # would compile again for every new value
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        compiled, compiled_weights = train("on", 1.0)
    assert (eager["compiled"], compiled["compiled"]) == (False, True) and compiled["compile_seconds"] > 0
    for name, weight in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], weight, rtol=1e-4, atol=1e-5, msg=name)
    gamma = "features.1.weight"  # a BN weight, which the penalty pulls towards 0
    assert not torch.allclose(train("off", 0.0)[1][gamma], eager_weights[gamma], atol=1e-3)


def test_the_compiled_update_is_one_graph(tmp_path):
    # hooks before the optimizer, its step and the hooks after it: one graph, no break (torch.optim's step
    # wrapper would add two), so on CUDA the update is one graph replay a step
    from torch._dynamo.utils import counters
    from ebtrain.search import L1Sparsity

    torch._dynamo.reset()
    counters.clear()
    trainer = make_trainer(tiny_config(tmp_path, data={"synthetic_size": 64}, train={"epochs": 1, "compile": "on"}),
                           None)
    trainer.hooks.append(L1Sparsity(trainer.model, 1e-4))
    trainer.fit()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert trainer.steps == 2


def test_compile_setting_resolves_by_device(tiny):
    from ebtrain.config import compile_step, rounding_multiple
    assert [compile_step(tiny.train, d) for d in ("cpu", "cuda")] == [False, True]
    tiny.train.compile = "off"
    assert not compile_step(tiny.train, "cuda")
    assert [rounding_multiple(tiny.search, d) for d in ("cpu", "cuda")] == [1, 8]
    tiny.search.round_channels = 4
    assert rounding_multiple(tiny.search, "cuda") == 4


def test_a_saved_config_of_the_boolean_compile_setting_still_loads(tmp_path):
    from ebtrain.config import load_yaml
    path = tmp_path / "config.yaml"
    for old, new in (("false", "off"), ("true", "on")):
        path.write_text(f"train:\n  compile: {old}\n")
        assert load_yaml(path).train.compile == new
