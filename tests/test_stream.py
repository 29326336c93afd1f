"""Tests of ebtrain.stream: the streaming loader, the choice between it and the in-memory one, and training
through it end to end (killed and resumed too), on small folders of generated JPEGs of mixed sizes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ebtrain import data
from ebtrain.config import DataConfig
from ebtrain.data import FileSet, load_data
from ebtrain.errors import UserError
from ebtrain.models import load_model
from ebtrain.stream import StreamLoader, make_loader

from conftest import run_cli
from test_reliability import assert_same_weights, run_killed

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def write_jpegs(root: Path, per_class: int = 24, test_per_class: int = 8, sizes=(40, 120), seed: int = 0,
                test: str = "test", suffix: str = ".jpg") -> Path:
    """train/ and `test`/ folders of 2 classes (dark and light noise) of JPEGs named *`suffix`, each side drawn
    from `sizes` (one size for all when its two ends are equal)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), (test, test_per_class)):
        for label, name in enumerate(("dark", "light")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = rng.integers(sizes[0], sizes[1] + 1, 2)
                pixels = rng.normal(70 + 110 * label, 40, (h, w, 3)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}{suffix}", format="JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    return write_jpegs(tmp_path_factory.mktemp("mixed"))


def folder_config(root: Path, **settings) -> DataConfig:
    return DataConfig(dataset="imagefolder", data_dir=str(root), **{"image_size": 16, "workers": 0, **settings})


# ----------------------------------------------------------------------------- which loader

def test_auto_streams_mixed_sizes_and_holds_equal_sizes_in_memory(mixed, tmp_path, monkeypatch, capsys):
    streamed = load_data(folder_config(mixed))
    assert streamed.loader == "stream" and isinstance(streamed.train, FileSet)
    assert (len(streamed.train), len(streamed.test)) == (48, 16) and streamed.input_shape == (3, 16, 16)
    assert "loader: stream (64 images of mixed sizes)" in capsys.readouterr().err

    cifar_like = write_jpegs(tmp_path / "equal", per_class=4, test_per_class=2, sizes=(32, 32))
    held = load_data(folder_config(cifar_like))
    assert held.loader == "memory" and held.train.images.shape == (8, 3, 32, 32) and held.input_shape == (3, 32, 32)
    assert "loader: memory (12 images of 32x32" in capsys.readouterr().err

    monkeypatch.setattr(data, "MEMORY_FRACTION", 1e-12)  # the same folder no longer fits
    assert load_data(folder_config(cifar_like)).loader == "stream"
    assert "loader: stream (12 images of 32x32, 0 MiB decoded, limit 0 MiB (0% of RAM))" in capsys.readouterr().err
    assert load_data(folder_config(cifar_like, loader="memory")).loader == "memory"


def test_auto_streams_when_the_sampled_headers_missed_a_different_size(mixed, monkeypatch):
    monkeypatch.setattr(data, "_header_size", lambda path: (8, 8))  # every header sampled looks alike
    assert load_data(folder_config(mixed)).loader == "stream"  # the decoding found the sizes differ
    with pytest.raises(UserError, match="differ in size.*--loader stream"):
        load_data(folder_config(mixed, loader="memory"))


def test_stream_is_for_image_folders():
    with pytest.raises(UserError, match="--loader stream reads image folders"):
        load_data(DataConfig(dataset="digits", loader="stream"))


# ----------------------------------------------------------------------------- the loader

def stream_batches(files: FileSet, epoch: int, **options) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = StreamLoader(files, 8, image_size=16, mean=MEAN, std=STD, seed=3, **options)
    loader.set_epoch(epoch)
    return list(loader)


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_same_batches_for_the_same_seed_and_epoch_whatever_the_workers(mixed):
    files = load_data(folder_config(mixed)).train
    one = stream_batches(files, 2, shuffle=True, augment=True, workers=0)
    assert_same_batches(one, stream_batches(files, 2, shuffle=True, augment=True, workers=2))
    assert [tuple(x.shape) for x, _ in one] == [(8, 3, 16, 16)] * 6
    other_epoch = stream_batches(files, 3, shuffle=True, augment=True, workers=0)
    assert not torch.equal(torch.cat([y for _, y in one]), torch.cat([y for _, y in other_epoch]))
    # the training process's own generator is left as it was
    state = torch.get_rng_state()
    stream_batches(files, 2, shuffle=True, augment=True, workers=0)
    assert torch.equal(state, torch.get_rng_state())


def test_ranks_together_see_the_batches_of_one_process(mixed):
    files = load_data(folder_config(mixed)).train
    whole = stream_batches(files, 1, shuffle=True, augment=True, even_shards=True)
    shares = [stream_batches(files, 1, shuffle=True, augment=True, even_shards=True, rank=r, world_size=2)
              for r in range(2)]
    assert_same_batches(whole, [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*shares)])


def test_evaluation_is_a_center_crop_of_the_resized_image(tmp_path):
    image = np.zeros((70, 140, 3), np.uint8)
    image[:, 35:105] = 255  # a white square in the middle: resized to 18 x 36, center crop 16 x 16 is all white
    (tmp_path / "a.png").parent.mkdir(exist_ok=True)
    Image.fromarray(image).save(tmp_path / "a.png")
    files = FileSet([str(tmp_path / "a.png")], torch.tensor([0]))
    (x, y), = list(StreamLoader(files, 1, image_size=16, mean=(0, 0, 0), std=(1, 1, 1)))
    assert x.shape == (1, 3, 16, 16) and y.tolist() == [0]
    assert torch.allclose(x[0, :, :, 1:-1], torch.ones(3, 16, 14), atol=0.02)


def test_make_loader_picks_the_loader_of_the_bundle(mixed):
    bundle = load_data(folder_config(mixed))
    train = make_loader(bundle, "train", 16, train=True, seed=1)
    assert isinstance(train, StreamLoader) and train.augment and train.shuffle and len(train) == 3
    test = make_loader(bundle, "test", 10)
    assert not test.augment and not test.shuffle and (len(test), test.num_samples) == (2, 16)


# ----------------------------------------------------------------------------- end to end

STREAM_FLAGS = ["--dataset", "imagefolder", "--loader", "stream", "--image-size", "16", "--workers", "1",
                "--arch", "vgg11", "--width", "0.125", "--batch-size", "16", "--lr", "0.05", "--device", "cpu",
                "--progress", "off", "--no-tensorboard"]


def test_search_prune_retrain_on_mixed_size_jpegs_through_the_streaming_path(mixed, tmp_path):
    run = tmp_path / "run"
    result = run_cli(*STREAM_FLAGS, "--data-dir", str(mixed), "--epochs", "4", "--ratios", "0.3", "--eps", "0.5",
                     "--queue-length", "2", "--out", str(run))
    assert result.returncode == 0, result.stderr
    assert "loader: stream (64 images, --loader stream)" in result.stderr
    summary = json.loads((run / "summary.json").read_text())
    ticket = summary["tickets"]["p30"]
    assert ticket["last_epoch"] == 4 and ticket["final_test_acc"] is not None
    assert (run / "retrain" / "p30" / "model.pt").is_file()


def test_killed_streaming_run_resumes_to_the_unbroken_result(mixed, tmp_path):
    args = ["train", *STREAM_FLAGS, "--data-dir", str(mixed), "--epochs", "3", "--workers", "0"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_cli(*args, "--out", str(straight)).returncode == 0
    run_killed([*args, "--out", str(killed)], "checkpoint.pt|2|before")  # mid-checkpoint, epoch 2
    resumed = run_cli("train", "--resume", "--out", str(killed))
    assert resumed.returncode == 0, resumed.stderr

    def metrics(run: Path) -> list[dict]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]

    assert metrics(killed) == metrics(straight) and len(metrics(straight)) == 3
    assert_same_weights(load_model(killed / "model.pt").state_dict(), load_model(straight / "model.pt").state_dict())
