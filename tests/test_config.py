from pathlib import Path

import pytest
import torch

from ebtrain.cli import build_parser, resolve_config
from ebtrain.config import (Config, DataConfig, SECTIONS, apply_overrides, check_allowed, dump_yaml, fields_of,
                            load_yaml, resolve_milestones)
from ebtrain.data import load_data
from ebtrain.errors import UserError
from ebtrain.validate import validate


def parse(argv):
    return resolve_config(build_parser().parse_args(argv))


def test_defaults_are_the_papers_recipe():
    cfg = Config()
    assert (cfg.model.arch, cfg.data.dataset) == ("vgg16", "cifar10")
    t = cfg.train
    assert (t.optimizer, t.lr, t.momentum, t.weight_decay, t.batch_size, t.epochs, t.seed) == \
        ("sgd", 0.1, 0.9, 1e-4, 256, 160, 1)
    assert resolve_milestones(t.milestones, t.epochs) == [80, 120]
    assert cfg.search.ratios == [0.3, 0.5, 0.7] and cfg.search.sparsity == 1e-4


def test_every_field_has_help_and_a_flag():
    parser = build_parser()
    search = parser._subparsers._group_actions[0].choices["search"]
    flags = {opt for action in search._actions for opt in action.option_strings}
    for section in SECTIONS:
        for f in fields_of(section):
            assert f.metadata["help"], f"{section}.{f.name} has no help"
            assert "--" + f.name.replace("_", "-") in flags


def test_precedence_defaults_file_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.05\n  epochs: 40\nmodel:\n  width: 0.5\n")
    cfg = parse(["search", "--config", str(path), "--lr", "0.02", "--ratios", "0.2", "0.4"])
    assert cfg.train.lr == 0.02            # flag beats file
    assert cfg.train.epochs == 40          # file beats default
    assert cfg.model.width == 0.5
    assert cfg.train.momentum == 0.9       # default stays
    assert cfg.search.ratios == [0.2, 0.4]


def test_bool_flags_and_choices():
    cfg = parse(["train", "--no-tensorboard", "--download", "--eb-rule", "reference"])
    assert cfg.run.tensorboard is False and cfg.data.download is True
    assert cfg.search.eb_rule == "reference"


def test_yaml_round_trip(tmp_path):
    cfg = apply_overrides(Config(), {"train": {"lr": 0.3, "milestones": [10, 20]}, "search": {"eps": 0.05}})
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_yaml(path) == cfg


def test_unknown_key_suggests_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rat: 0.1\n")
    with pytest.raises(UserError, match="unknown setting 'train.learning_rat'"):
        load_yaml(path)
    with pytest.raises(UserError, match="did you mean 'epochs'"):
        apply_overrides(Config(), {"train": {"epoch": 3}})
    with pytest.raises(UserError, match="did you mean 'search'"):
        apply_overrides(Config(), {"serch": {}})


def test_wrong_types_are_refused():
    with pytest.raises(UserError, match="train.epochs"):
        apply_overrides(Config(), {"train": {"epochs": "many"}})
    with pytest.raises(UserError, match="choose from"):
        apply_overrides(Config(), {"search": {"eb_rule": "papr"}})


def test_milestone_fractions_and_epochs():
    assert resolve_milestones([0.5, 0.75], 40) == [20, 30]
    assert resolve_milestones([30, 10], 40) == [10, 30]


def test_every_shipped_config_loads_and_passes_validation():
    from ebtrain.validate import validate
    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(files) >= 8
    for path in files:
        validate(load_yaml(path))


# Frankle & Carbin (ICLR 2019), Figure 2: Adam's rate, iterations and the conv layers' pruning rate per
# round; batch 60, fully connected layers 20% and the output layer 10% per round, for all three
PAPER_CONV_NETS = {"conv2": (2e-4, 20_000, 0.1), "conv4": (3e-4, 25_000, 0.1), "conv6": (3e-4, 30_000, 0.15)}


def test_the_small_conv_network_configs_follow_the_paper():
    root = Path(__file__).resolve().parents[1] / "configs"
    for arch, (lr, iterations, conv_rate) in PAPER_CONV_NETS.items():
        cfg = load_yaml(root / f"{arch}_cifar10.yaml")
        assert (cfg.model.arch, cfg.train.optimizer, cfg.train.lr, cfg.train.batch_size) == (arch, "adam", lr, 60)
        lot = cfg.lottery
        assert (lot.iterations, lot.conv_rate, lot.fc_rate, lot.output_rate) == (iterations, conv_rate, 0.2, 0.1)
# Frankle & Carbin (ICLR 2019), Figure 2 and the appendix, the warmup recipes of the deep networks: SGD's rate,
# momentum 0.9, batch, iterations, the milestones (rate / 10) and warmup in iterations; 20% of the conv weights
# per round, globally, the output layer not pruned. Their "Resnet-18" is the CIFAR ResNet ebtrain calls resnet20.
PAPER_DEEP_NETS = {"vgg19": ("vgg19", 0.1, 64, 112_000, [56_000, 84_000], 10_000),
                   "resnet18": ("resnet20", 0.03, 128, 30_000, [20_000, 25_000], 20_000)}


@pytest.mark.parametrize("name", PAPER_DEEP_NETS)
def test_the_deep_network_configs_follow_the_papers_warmup_recipes(name):
    from ebtrain.lottery.masks import prunable_weights
    from ebtrain.models import build_model
    arch, lr, batch, iterations, milestones, warmup = PAPER_DEEP_NETS[name]
    cfg = load_yaml(Path(__file__).resolve().parents[1] / "configs" / f"{name}_cifar10.yaml")
    t, lot = cfg.train, cfg.lottery
    assert (cfg.model.arch, t.optimizer, t.lr, t.momentum, t.batch_size, t.gamma) == (arch, "sgd", lr, 0.9, batch, 0.1)
    assert (lot.iterations, t.warmup_iter, resolve_milestones(t.milestones, lot.iterations)) == \
        (iterations, warmup, milestones)
    assert (lot.global_pruning, lot.rate, lot.conv_rate, lot.output_rate) == (True, 0.2, 0.2, 0.0)
    assert cfg.data.dataset == "cifar10" and cfg.data.val_size > 0
    kinds = prunable_weights(build_model(arch))
    assert set(kinds.values()) == {"conv", "output"}  # no hidden fully connected layer: conv pruned, output not


def test_the_papers_resnet18_is_resnet20():
    # 16, 3x[16, 16], 3x[32, 32], 3x[64, 64], average pool, fully connected: 270K conv weights
    from ebtrain.models import build_model
    model = build_model("resnet20")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert [c.out_channels for c in convs] == [16] + [16] * 6 + [32] * 6 + [64] * 6
    assert round(sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d)), -4) == 270_000


def test_defaults_are_within_every_declared_bound():
    check_allowed(Config())
    validate(Config())


@pytest.mark.parametrize("section,name,value,message", [
    ("search", "eps", 1.0, "--eps 1.0: must lie in (0, 1)"),
    ("search", "flops_targets", [0.5, 1.5], "--flops-targets 0.5 1.5: each must lie in (0, 1)"),
    ("search", "bits", 1, "--bits 1: must lie in [2, 24]"),
    ("train", "weight_decay", -1e-4, "--weight-decay -0.0001: must be 0 or more"),
    ("model", "width", 0.0, "--width 0.0: must be a positive number"),
    ("train", "warmup_iter", -1, "--warmup-iter -1: must be 0 or more"),
    ("lottery", "fc_rate", 1.0, "--fc-rate 1.0: must lie in [0, 1), or -1"),
    ("lottery", "seeds", 0, "--seeds 0: must be at least 1"),
    ("data", "augment", "maybe", "--augment maybe: choose from auto, on, off"),
])
def test_a_setting_outside_its_declared_bounds_is_named_by_its_flag(section, name, value, message):
    cfg = Config()
    setattr(getattr(cfg, section), name, value)
    for check in (check_allowed, validate):  # validate checks the declared bounds through check_allowed
        with pytest.raises(UserError) as error:
            check(cfg)
        assert str(error.value) == message


def test_special_values_outside_the_interval_are_allowed():
    cfg = apply_overrides(Config(), {"lottery": {"conv_rate": -1, "fc_rate": 0.0, "output_rate": 0.5}})
    check_allowed(cfg)


def test_load_data_checks_the_bounds_of_its_section():
    with pytest.raises(UserError, match="--synthetic-size 0: must be at least 1"):
        load_data(DataConfig(dataset="synthetic", synthetic_size=0))
    with pytest.raises(UserError, match="--val-size -1: must be 0 or more"):
        load_data(DataConfig(dataset="synthetic", val_size=-1))
