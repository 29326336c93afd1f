"""--dataset imagenet (an image folder whose test split is val/, streamed, 224 px by default), the ImageNet
ResNets trained through it, and the ImageNet configs: on a tiny folder of generated JPEGs of mixed sizes."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from ebtrain.cli import main
from ebtrain.config import DataConfig, load_yaml, resolve_milestones
from ebtrain.data import IMAGENET_STATS, FileSet, load_data
from ebtrain.errors import UserError
from ebtrain.models import load_model

from conftest import ROOT, run_cli
from test_stream import write_jpegs

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

QUIET = ["--workers", "0", "--device", "cpu", "--progress", "off", "--no-tensorboard"]


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    """DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG: 2 classes of 6 + 2 images, 20 to 60 pixels a side."""
    return write_jpegs(tmp_path_factory.mktemp("imagenet"), per_class=6, test_per_class=2, sizes=(20, 60),
                       test="val", suffix=".JPEG")


def test_imagenet_is_an_image_folder_tested_on_val_streamed_at_224(imagenet, capsys):
    bundle = load_data(DataConfig(dataset="imagenet", data_dir=str(imagenet), workers=0))
    assert bundle.loader == "stream" and isinstance(bundle.test, FileSet)
    assert (len(bundle.train), len(bundle.test), bundle.classes) == (12, 4, ["dark", "light"])
    assert {Path(p).parent.parent.name for p in bundle.test.paths} == {"val"}
    assert bundle.input_shape == (3, 224, 224) and (bundle.mean, bundle.std) == IMAGENET_STATS and bundle.augment
    assert "loader: stream (16 images, --dataset imagenet)" in capsys.readouterr().err
    assert load_data(DataConfig(dataset="imagenet", data_dir=str(imagenet), image_size=48)).input_shape == (3, 48, 48)


def test_imagenet_without_val_names_the_folder_and_the_layout(imagenet, tmp_path):
    root = tmp_path / "no-val"
    shutil.copytree(imagenet / "train", root / "train")
    (root / "test").mkdir()  # an imagefolder's test split is not imagenet's
    layout = f"'{root}' has no val/ folder: expected {root / 'train'}/<class>/* and {root / 'val'}/<class>/*"
    with pytest.raises(UserError, match=re.escape(layout)):
        load_data(DataConfig(dataset="imagenet", data_dir=str(root)))


def test_search_prune_retrain_resnet18_imagenet_through_the_cli(imagenet, tmp_path):
    run = tmp_path / "run"
    result = run_cli("--dataset", "imagenet", "--data-dir", str(imagenet), "--image-size", "32", *QUIET,
                     "--arch", "resnet18_imagenet", "--width", "0.0625", "--batch-size", "8", "--lr", "0.05",
                     "--epochs", "3", "--ratios", "0.3", "--eps", "0.5", "--queue-length", "2", "--out", str(run))
    assert result.returncode == 0, result.stderr
    assert "loader: stream (16 images, --dataset imagenet)" in result.stderr
    ticket = json.loads((run / "summary.json").read_text())["tickets"]["p30"]
    assert ticket["last_epoch"] == 3 and ticket["final_test_acc"] is not None
    pruned = load_model(run / "retrain" / "p30" / "model.pt")
    assert (pruned.arch["name"], pruned.arch["image_size"]) == ("resnet18_imagenet", 32)
    assert sum(bn.num_features for _, bn in pruned.prunable_bns()) == ticket["channels_kept"] < ticket["channels_total"]


@pytest.mark.parametrize("arch", ["resnet18_imagenet", "resnet50_imagenet"])
def test_imagenet_config_holds_the_recipe_and_trains_an_epoch_when_shrunk(arch, imagenet, tmp_path):
    config = ROOT / "configs" / f"{arch}.yaml"
    cfg = load_yaml(config)
    t = cfg.train
    assert (cfg.data.dataset, cfg.data.image_size, cfg.data.loader, cfg.model.arch) == ("imagenet", 224, "stream", arch)
    assert (t.epochs, t.batch_size, t.lr, t.optimizer, t.momentum, t.weight_decay) == (90, 256, 0.1, "sgd", 0.9, 1e-4)
    assert resolve_milestones(t.milestones, t.epochs) == [30, 60, 80] and t.gamma == 0.1
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--data-dir", str(imagenet), "--image-size", "32", "--width",
                 "0.0625", "--epochs", "1", "--milestones", "--batch-size", "6", *QUIET, "--out", str(run)]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and math.isfinite(metrics[0]["train_loss"])
    assert load_model(run / "model.pt").arch["name"] == arch
