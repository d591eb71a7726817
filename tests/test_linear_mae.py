"""The faithful linear probe (`--protocol mae`): fresh seeded views every epoch, the official test view."""

import numpy as np
import pytest
import torch

from mage_bench.config import DataConfig, RunConfig, resolve_config
from mage_bench.data import create_dataset
from mage_bench.eval.linear_views import (
    AUGMENT_FOLDER,
    AUGMENT_IN_MEMORY,
    TEST_VIEW,
    FolderViews,
    eval_resize,
    linear_probe_mae_views,
    open_split,
    sample_crop,
    tensor_train_views,
    view_generator,
)
from mage_bench.results import read_records
from mage_bench.train import train


@pytest.fixture
def run(tmp_path, tiny_run_layer):
    train(resolve_config(RunConfig, tiny_run_layer), tmp_path / "run", progress=False)
    return tmp_path / "run"


@pytest.fixture
def folder(tmp_path) -> DataConfig:
    """A two-class image folder of non-square PNGs (train: 4 per class, val: 2 per class) at the runs' 16 px."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for label in ("a", "b"):
            (tmp_path / "images" / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(20 + 4 * i, 28, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "images" / split / label / f"{i}.png")
    return DataConfig(name=f"imagefolder:{tmp_path / 'images'}", image_size=16)


def test_views_are_new_every_epoch_and_fixed_by_seed_epoch_and_index():
    images, _ = create_dataset(DataConfig(), "train", train_transform=False).tensors()
    indices = torch.arange(12)
    first = tensor_train_views(images, indices, seed=0, epoch=0, size=16)
    assert first.shape == (12, 3, 16, 16) and first.min() >= 0.0 and first.max() <= 1.0
    assert torch.equal(first, tensor_train_views(images, indices, seed=0, epoch=0, size=16))
    assert not torch.equal(first, tensor_train_views(images, indices, seed=0, epoch=1, size=16))
    assert not torch.equal(first, tensor_train_views(images, indices, seed=1, epoch=0, size=16))
    # A view belongs to (seed, epoch, index): the shuffle order does not change it.
    assert torch.equal(first.flip(0), tensor_train_views(images, indices.flip(0), seed=0, epoch=0, size=16))


def test_folder_views_differ_between_epochs(folder):
    base = open_split(folder, "train")
    epoch0, again, epoch1 = (FolderViews(base, 16, seed=0, epoch=e)[3][0] for e in (0, 0, 1))
    assert epoch0.shape == (3, 16, 16) and torch.equal(epoch0, again) and not torch.equal(epoch0, epoch1)


def test_random_resized_crop_boxes_stay_inside_and_span_the_scale_range():
    shares = []
    for index in range(300):
        top, left, h, w = sample_crop(30, 40, view_generator(0, 0, index))
        assert 0 <= top <= 30 - h and 0 <= left <= 40 - w and h > 0 and w > 0
        shares.append(h * w / (30 * 40))
    assert 0.18 <= min(shares) < 0.3 and 0.9 < max(shares) <= 1.0  # scale (0.2, 1.0), up to rounding
    # No box of an allowed aspect ratio fits a 1 x 50 strip: the centred fallback.
    assert sample_crop(1, 50, view_generator(0, 0, 0)) == (0, 24, 1, 1)


def test_the_test_view_is_resize_292_over_256_bicubic_then_centre_crop(folder):
    from PIL import Image
    from torchvision import transforms as T

    assert eval_resize(256) == 292 and eval_resize(16) == 18
    base, views = open_split(folder, "test"), FolderViews(open_split(folder, "test"), 16, seed=0, epoch=None)
    path, label = base.samples[1]
    expected = T.Compose([T.Resize(18, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(16),
                          T.ToTensor()])(Image.open(path).convert("RGB"))
    view, view_label = views[1]
    assert view.shape == (3, 16, 16) and view_label == label and torch.equal(view, expected)


def test_the_probe_trains_on_each_epochs_views_and_is_seeded(run, folder, monkeypatch):
    from mage_bench.eval import features
    from mage_bench.runs import load_run

    loaded, seen = load_run(run), []
    real = features.probe_features

    def spy(run, images):
        seen.append(images.sum(dim=(1, 2, 3)).sort().values)  # per-image sums, independent of the shuffle
        return real(run, images)

    monkeypatch.setattr(features, "probe_features", spy)
    options = dict(epochs=2, batch_size=8, blr=1.0)
    result = linear_probe_mae_views(loaded, folder, seed=0, **options)
    epoch0, epoch1, _test = seen
    assert not torch.allclose(epoch0, epoch1)  # the head saw new views in epoch 1
    assert linear_probe_mae_views(loaded, folder, seed=0, **options) == result
    assert result["augment"] == AUGMENT_FOLDER and result["test_view"] == TEST_VIEW and result["n_test"] == 4
    assert result["epochs"] == 2 and result["lr"] == pytest.approx(1.0 * 8 / 256)


def test_records_keep_mae_and_mae_cached_apart(run, folder):
    from mage_bench.config import EvalConfig
    from mage_bench.eval.runner import evaluate_run

    settings = EvalConfig(probe_epochs=2, probe_batch_size=8)
    written = evaluate_run(run, ["linear-mae", "linear-mae-cached"], settings, data_name=folder.name)
    for name, protocol, augment in (("linear-mae", "mae", AUGMENT_FOLDER), ("linear-mae-cached", "mae-cached", "none")):
        records = read_records(run / "eval" / f"{name}.json")
        assert records == written[name] and {r["metric"] for r in records} == {"top1", "top5"}
        assert all(r["evaluator"] == name and r["protocol"] == protocol and r["augment"] == augment
                   and r["n_samples"] == 4 and r["epochs"] == 2 for r in records)
    assert {r["test_view"] for r in written["linear-mae"]} == {TEST_VIEW}
    assert {r["test_view"] for r in written["linear-mae-cached"]} != {TEST_VIEW}


def test_in_memory_digits_are_cropped_without_flips(run):
    from mage_bench.runs import load_run

    result = linear_probe_mae_views(load_run(run), DataConfig(), epochs=1, batch_size=1024)
    assert result["augment"] == AUGMENT_IN_MEMORY and "no-flip" in AUGMENT_IN_MEMORY and result["n_test"] == 360


@pytest.mark.parametrize("argv, message", [
    (["eval", "knn", "--run", "r", "--protocol", "mae"], "--protocol mae applies to `eval linear` only"),
    (["eval", "all", "--run", "r", "--protocol", "mae-cached"], "--protocol mae-cached applies to `eval linear`"),
    (["eval", "linear", "--run", "r", "--probe-epochs", "3"], "--probe-epochs needs `eval linear --protocol mae`"),
])
def test_cli_rejects_protocol_flags_where_they_do_not_apply(argv, message, capsys):
    from mage_bench.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
