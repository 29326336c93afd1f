"""Model registry and families: shapes, arch round trips, init, prunable BNs, save/load."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ebtrain.checkpoint import atomic_save
from ebtrain.errors import UserError
from ebtrain.models import (build_model, count_params, list_models, load_model, save_model,
                            scaled)
from ebtrain.models.preresnet import ChannelSelection

# Small widths keep every model CPU-cheap; resnet18/50 and VGG start at 64 channels, hence smaller.
WIDTH = {"vgg": 0.125, "resnet18": 0.0625, "resnet50": 0.0625, "lenet300_100": 0.25, "conv": 0.125}


def small(name: str, **kwargs) -> nn.Module:
    width = next((w for prefix, w in WIDTH.items() if name.startswith(prefix)), 0.25)
    return build_model(name, width=width, **kwargs)


def test_registry_lists_every_family():
    assert list_models() == ["vgg11", "vgg13", "vgg16", "vgg19", "preresnet", "preresnet56",
                             "preresnet101", "preresnet164", "resnet20", "resnet32", "resnet56",
                             "resnet18", "resnet18_imagenet", "resnet50_imagenet", "lenet300_100", "conv2", "conv4", "conv6"]


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("image_size", [32, 28, 8])
def test_output_shape(name, in_channels, image_size):
    model = small(name, num_classes=7, in_channels=in_channels, image_size=image_size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_models())
def test_arch_rebuilds_identical_architecture(name):
    model = small(name, num_classes=5, in_channels=1, image_size=28)
    arch = json.loads(json.dumps(model.arch))  # JSON-serialisable, and survives the trip
    assert arch["name"] == name
    rebuilt = build_model(**arch)
    assert type(rebuilt) is type(model)
    assert rebuilt.arch == model.arch
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}


def test_width_scales_channels():
    assert scaled(64, 0.5) == 32 and scaled(3, 0.1) == 1
    model = build_model("vgg16", width=0.5)
    assert model.features[0].out_channels == 32
    assert model.arch["cfg"][:3] == [32, 32, "M"]
    assert count_params(build_model("conv2", width=0.5)) < count_params(build_model("conv2"))


def test_unknown_arch_suggests_close_name():
    with pytest.raises(UserError, match=r"unknown arch 'VGG16' \(did you mean 'vgg16'\?\): "
                                        r"choose from vgg11, vgg13, "):
        build_model("VGG16")
    with pytest.raises(UserError, match="did you mean 'resnet20'"):
        build_model("resnt20")
    with pytest.raises(UserError, match=r"unknown arch 'xyz': choose from"):
        build_model("xyz")


@pytest.mark.parametrize("kwargs", [
    {"name": "preresnet", "depth": 57},
    {"name": "preresnet", "depth": 2},
    {"name": "preresnet56", "depth": 20},
    {"name": "vgg16", "depth": 16},
    {"name": "resnet20", "width": 0.0},
    {"name": "resnet20", "num_classes": 0},
    {"name": "vgg11", "cfg": [8, "M", 0]},
    {"name": "resnet20", "cfg": [4, 4]},
    {"name": "conv6", "image_size": 4},
    {"name": "preresnet", "depth": 11, "width": 0.5, "cfg": [9, 8, 8, 32, 16, 16, 64, 32, 32, 128]},
    {"name": "resnet20", "cfg": [4, 4, 4, 4, 4, 4, 4, 4, "M"]},
])
def test_bad_arguments_are_user_errors(kwargs):
    with pytest.raises(UserError):
        build_model(**kwargs)


def test_vgg_matches_network_slimming():
    model = build_model("vgg16", width=0.125)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 13
    assert all((bn.weight == 0.5).all() and (bn.bias == 0).all() for bn in bns)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].in_features == scaled(512, 0.125)
    assert sum(isinstance(m, nn.MaxPool2d) and m.ceil_mode for m in model.modules()) == 4


def test_prunable_bns_per_family():
    vgg = small("vgg11")
    assert [n for n, _ in vgg.prunable_bns()] == \
        [n for n, m in vgg.named_modules() if isinstance(m, nn.BatchNorm2d)]

    pre = build_model("preresnet", depth=20, width=0.25)  # 2 blocks per stage, 6 blocks
    names = [n for n, _ in pre.prunable_bns()]
    assert len(names) == 3 * 6 + 1
    assert names[:4] == ["layers.0.0.bn1", "layers.0.0.bn2", "layers.0.0.bn3", "layers.0.1.bn1"]
    assert names[-1] == "bn"

    res = small("resnet20")
    names = [n for n, _ in res.prunable_bns()]
    assert len(names) == 9 and all(n.endswith(".bn1") for n in names)
    all_bns = {n for n, m in res.named_modules() if isinstance(m, nn.BatchNorm2d)}
    residual_feeding = all_bns - set(names)
    assert "stem.1" in residual_feeding and "layers.1.0.shortcut.1" in residual_feeding
    assert all(not n.endswith("bn1") for n in residual_feeding)
    assert len(small("resnet18").prunable_bns()) == 8 == len(small("resnet18_imagenet").prunable_bns())
    bottlenecks = small("resnet50_imagenet")
    names = [n for n, _ in bottlenecks.prunable_bns()]
    assert len(names) == 2 * 16 and names[:3] == ["layers.0.0.bn1", "layers.0.0.bn2", "layers.0.1.bn1"]

    for name in ("lenet300_100", "conv2", "conv4", "conv6"):
        assert small(name).prunable_bns() == []


def test_preresnet_dense_cfg_and_selection():
    model = build_model("preresnet", depth=11, width=0.5)  # one block per stage
    assert model.arch["cfg"] == [8, 8, 8, 32, 16, 16, 64, 32, 32, 128]
    selections = [m for m in model.modules() if isinstance(m, ChannelSelection)]
    assert len(selections) == 4 and all(s.mask.all() and s.dense for s in selections)


def test_channel_selection_follows_loaded_mask():
    selection = ChannelSelection(6, 2)
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert selection(x).flatten().tolist() == [0.0, 1.0]
    state = {"mask": torch.tensor([False, True, False, False, False, True])}
    selection.load_state_dict(state)
    assert selection(x).flatten().tolist() == [1.0, 5.0]
    assert list(selection.state_dict()) == ["mask"]  # the cached indices are not saved


@pytest.mark.parametrize("name", ["vgg11", "preresnet", "resnet20", "conv4"])
def test_save_load_round_trip(tmp_path, name):
    model = small(name).eval()
    path = tmp_path / "model.pt"
    save_model(model, path, epoch=3)
    loaded = load_model(path)
    assert not loaded.training and loaded.arch == model.arch
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_load_model_rejects_other_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(UserError, match="garbage.pt is not a model file"):
        load_model(garbage)
    other = tmp_path / "other.pt"
    atomic_save({"epoch": 1}, other)
    with pytest.raises(UserError, match="other.pt is not a model file"):
        load_model(other)
    mismatched = tmp_path / "mismatched.pt"
    atomic_save({"arch": build_model("resnet20", width=0.5).arch,
                 "state_dict": build_model("resnet20", width=0.25).state_dict()}, mismatched)
    with pytest.raises(UserError, match="mismatched.pt: weights do not fit"):
        load_model(mismatched)
