"""Generation at ImageNet scale (issue 16, items 1, 8, 13): concurrent runs sharing a FID cache, reference
folders keyed on the resolved data set, batched PNG writes that stay byte-identical and crash-safe, and
the pre-training check of the generation inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mage_bench.config import DataConfig, EvalConfig
from mage_bench.errors import UserError
from mage_bench.eval import image_sets
from mage_bench.eval.image_sets import dataset_reference, list_images
from mage_bench.io import atomic_create, atomic_open
from mage_bench.samples import PARTIAL, remove_partials, to_uint8, write_pngs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def random_digits_cnn(tmp_path_factory) -> Path:
    """digits-cnn weights with seeded random init: meaningless values, the real code path, no training."""
    from mage_bench.eval.extractors import _digits_cnn_network

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("extractor") / "digits-cnn-random.pt"
    torch.save({"model": _digits_cnn_network().state_dict()}, path)
    return path


def _png_folder(folder: Path, arrays) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(folder / f"{i:04d}.png")
    return folder


def _tree(root: Path, seed: int, n: int = 3) -> Path:
    """A tiny ImageNet-layout tree: ROOT/{train,val}/{c0,c1}/*.png, 8x8 RGB, pixels drawn from `seed`."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for label in ("c0", "c1"):
            _png_folder(root / split / label, rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8))
    return root


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in list_images(folder)}


# --------------------------------------------------------------------------------------------
# Item 1: concurrent runs on one fresh FID cache


def test_four_concurrent_eval_fid_on_a_fresh_cache_agree(tmp_path, random_digits_cnn):
    from mage_bench.data import create_dataset

    images = create_dataset(DataConfig(), "test", train_transform=False).images[:40]
    fake = _png_folder(tmp_path / "fake", to_uint8(images, "round").permute(0, 2, 3, 1).numpy())
    cache = tmp_path / "cache"  # fresh: every process renders the reference and extracts its statistics
    argv = [sys.executable, "-m", "mage_bench.cli", "eval", "fid", "--real", "digits", "--real-split", "test",
            "--fake", str(fake), "--cache", str(cache), "--weights", str(random_digits_cnn), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]  # all started before any is waited on
    results = [(p.wait(timeout=180), *p.communicate()) for p in procs]
    assert all(code == 0 for code, _, _ in results), [err for _, _, err in results]
    values = {json.loads(out)[0]["value"] for _, out, _ in results}
    assert len(values) == 1 and np.isfinite(values.pop())
    # One published reference; the losers' staging copies and temporary files are gone.
    references = [p.name for p in (cache / "reference-images").iterdir()]
    assert len(references) == 1 and references[0].startswith("digits-test-16px-")
    assert all(p.name.startswith("mage-bench-ref-") for p in (cache / "torch-fidelity").iterdir())


def test_a_reference_published_first_by_another_run_is_kept(tmp_path, monkeypatch):
    """The loser of the race (deterministically): another run publishes while this one is staging."""
    cache, real_write = tmp_path / "cache", image_sets._write_pngs
    published, raced = [], []

    def racing_write(dataset, folder, *args, **kwargs):
        if not raced:  # the other run, started later, finishes first
            raced.append(True)
            published.append(dataset_reference(DataConfig(), "test", cache).folder)
        real_write(dataset, folder, *args, **kwargs)

    monkeypatch.setattr(image_sets, "_write_pngs", racing_write)
    ours = dataset_reference(DataConfig(), "test", cache)
    assert ours.folder == published[0] and ours.count == 360
    assert [p.name for p in (cache / "reference-images").iterdir()] == [ours.folder.name]


def test_a_statistics_file_published_first_is_kept(tmp_path):
    path = tmp_path / "clean-fid" / "key.npy"
    with atomic_create(path) as ours:
        ours.write(b"ours")
        with atomic_create(path) as theirs:
            theirs.write(b"theirs")
    assert path.read_bytes() == b"theirs" and os.listdir(path.parent) == ["key.npy"]
    with pytest.raises(RuntimeError), atomic_create(tmp_path / "failed.npy") as handle:
        handle.write(b"half")
        raise RuntimeError("killed mid-write")
    assert sorted(os.listdir(tmp_path)) == ["clean-fid"]


# --------------------------------------------------------------------------------------------
# Item 8: the reference is keyed on the resolved data set, not the path as typed


def test_reference_is_keyed_on_the_resolved_tree_not_the_typed_path(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _tree(tmp_path / "a" / "data" / "tree", seed=1)
    _tree(tmp_path / "b" / "data" / "tree", seed=2)  # same names and layout, other pixels
    typed = DataConfig(name="imagefolder:data/tree", image_size=8)

    monkeypatch.chdir(tmp_path / "a")
    first = dataset_reference(typed, "test", cache)
    monkeypatch.chdir(tmp_path / "b")
    second = dataset_reference(typed, "test", cache)
    assert first.folder != second.folder and first.identity != second.identity
    assert _folder_bytes(first.folder) != _folder_bytes(second.folder)

    def no_rewrite(*args, **kwargs):
        raise AssertionError("an existing reference was rendered again")

    monkeypatch.setattr(image_sets, "_write_pngs", no_rewrite)
    monkeypatch.chdir(tmp_path / "a")
    again = dataset_reference(typed, "test", cache)
    absolute = dataset_reference(DataConfig(name=f"imagefolder:{tmp_path / 'a/data/tree'}", image_size=8,
                                            num_workers=2), "test", cache)  # workers change no pixel
    assert again == first and absolute.folder == first.folder and absolute.identity == first.identity
    assert len(list((cache / "reference-images").iterdir())) == 2


# --------------------------------------------------------------------------------------------
# Item 13: batched PNG writes, byte-identical and crash-safe


def _old_save_png(image: torch.Tensor, path: Path, png: str) -> None:
    """samples._save_png as it was: one file at a time through atomic_open."""
    array = to_uint8(image, png).permute(1, 2, 0).cpu().numpy()
    with atomic_open(path, "wb") as handle:
        Image.fromarray(array).save(handle, format="PNG")


@pytest.mark.parametrize("png", ["truncate", "round"])
def test_batched_sample_writes_are_byte_identical_to_per_file_writes(tmp_path, png):
    images = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for i, image in enumerate(images):
        _old_save_png(image, tmp_path / "old" / f"{i:06d}.png", png)
    (tmp_path / "new").mkdir()
    arrays = to_uint8(images, png).permute(0, 2, 3, 1).numpy()
    write_pngs([(tmp_path / "new" / f"{i:06d}.png", a) for i, a in enumerate(arrays)])
    assert _folder_bytes(tmp_path / "new") == _folder_bytes(tmp_path / "old")
    assert sorted(os.listdir(tmp_path / "new")) == sorted(_folder_bytes(tmp_path / "old"))  # no leftovers


def test_reference_pngs_with_workers_are_byte_identical_to_the_old_writer(tmp_path):
    from mage_bench.data import create_dataset

    dataset = create_dataset(DataConfig(name=f"imagefolder:{_tree(tmp_path / 'tree', seed=3)}", image_size=8),
                             "test", train_transform=False)
    old = tmp_path / "old"
    old.mkdir()
    index = 0  # the former image_sets._write_pngs, in one process, one file at a time
    for images, _ in torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=False):
        for array in (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
            Image.fromarray(array).save(old / f"{index:06d}.png")
            index += 1
    new = tmp_path / "new"
    new.mkdir()
    image_sets._write_pngs(dataset, new, False, "reference", num_workers=2)
    assert _folder_bytes(new) == _folder_bytes(old) and len(_folder_bytes(old)) == 6


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def untrained_run(tmp_path, tiny_model_overrides, tiny_tokenizer_overrides):
    """A `LoadedRun` of a seeded, untrained tiny MAGE and tokenizer: real decoding, no training."""
    from types import SimpleNamespace

    from mage_bench.config import RunConfig
    from mage_bench.mage import create_model
    from mage_bench.runs import LoadedRun
    from mage_bench.tokenizer import create_tokenizer

    torch.manual_seed(0)
    model = create_model("mage_tiny", **tiny_model_overrides).eval()
    tokenizer = create_tokenizer("vq_digits", **tiny_tokenizer_overrides).eval()
    config = SimpleNamespace(generate=RunConfig().generate, model=model.config)
    return LoadedRun(config, model, tokenizer, 0, "0" * 64, tmp_path / "run")


def test_a_crash_mid_batch_leaves_no_final_file_and_rerunning_completes(tmp_path, untrained_run, monkeypatch):
    from mage_bench import samples

    run = untrained_run
    clean = tmp_path / "clean"
    samples.generate_images(run, 6, clean, steps=2, batch_size=4, progress=False)

    out, real_encode, calls = tmp_path / "out", samples.encode_png, []

    def failing_encode(array, handle):  # the encoder dies on the third image of the first batch
        calls.append(1)
        if len(calls) == 3:
            handle.write(b"\x89PNG truncated")
            raise OSError("disk full")
        real_encode(array, handle)

    monkeypatch.setattr(samples, "encode_png", failing_encode)
    with pytest.raises(OSError, match="disk full"):
        samples.generate_images(run, 6, out, steps=2, batch_size=4, progress=False)
    assert sorted(os.listdir(out)) == ["generation.json"]  # no final name, no partial file left

    # The rename pass dies after two files (a kill between renames): those two are whole images.
    monkeypatch.setattr(samples, "encode_png", real_encode)
    real_replace, renamed = os.replace, []

    def dying_replace(src, dst):
        if str(src).endswith(PARTIAL) and len(renamed) == 2:
            raise KeyboardInterrupt
        renamed.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(samples.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        samples.generate_images(run, 6, out, steps=2, batch_size=4, progress=False)
    monkeypatch.setattr(samples.os, "replace", real_replace)
    finals = sorted(p.name for p in out.glob("0*.png"))
    assert finals == ["000000.png", "000001.png"]
    assert all((out / name).read_bytes() == (clean / name).read_bytes() for name in finals)

    # What `kill -9` mid-batch leaves: a partial file of a dead writer. Resume ignores and removes it.
    leftover = out / f".000002.png.{samples._host()}.{_dead_pid()}.0badf00d{PARTIAL}"
    leftover.write_bytes(b"\x89PNG half")
    samples.generate_images(run, 6, out, steps=2, batch_size=4, progress=False)
    assert not leftover.exists() and not list(out.glob(f"*{PARTIAL}"))
    assert _folder_bytes(out) == _folder_bytes(clean)  # resumed == straight, grid included


def test_remove_partials_keeps_live_writers_files(tmp_path):
    from mage_bench import samples

    host = samples._host()
    live = tmp_path / f".000001.png.{host}.{os.getppid()}.aa{PARTIAL}"  # our parent: alive
    dead = tmp_path / f".000002.png.{host}.{_dead_pid()}.bb{PARTIAL}"
    fresh_elsewhere = tmp_path / f".000003.png.otherhost.1.cc{PARTIAL}"
    stale_elsewhere = tmp_path / f".000004.png.otherhost.1.dd{PARTIAL}"
    for path in (live, dead, fresh_elsewhere, stale_elsewhere):
        path.write_bytes(b"")
    os.utime(stale_elsewhere, (0, 0))
    assert remove_partials(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, fresh_elsewhere.name])


# --------------------------------------------------------------------------------------------
# Item 5 (generation side): the inputs checked before any training


def test_check_generation_inputs_never_downloads_and_says_how_to_provide_weights(tmp_path, monkeypatch):
    from mage_bench.eval.extractors import INCEPTION_ENV, INCEPTION_FILE
    from mage_bench.eval.generation import check_generation_inputs

    def no_download(*args, **kwargs):
        raise AssertionError("check_generation_inputs downloaded")

    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    with pytest.raises(UserError) as info:
        check_generation_inputs(EvalConfig(), "imagefolder:/data/imagenet", ("fid",))
    message = str(info.value)
    assert "\n" not in message and INCEPTION_FILE in message and "--weights" in message
    assert INCEPTION_ENV in message and str(tmp_path / "hub" / "checkpoints") in message
    for settings, real, flags, expected in [
        (EvalConfig(backend="clean-fid"), "digits", ("fid", "isc"), "clean-fid computes"),
        (EvalConfig(), "digits", ("fid", "lpips"), "unknown generation metric"),
        (EvalConfig(), "no/such/folder", ("fid",),
         "neither a folder, a data set .* nor a statistics file \\(.npz, or torch-fidelity.s .pt\\)"),
        (EvalConfig(weights=str(tmp_path / "absent.pt")), "digits", ("fid",), "absent.pt"),
    ]:
        with pytest.raises(UserError, match=expected):
            check_generation_inputs(settings, real, flags)


def test_check_generation_inputs_resolves_the_weights_and_plan_uses_it(tmp_path, random_digits_cnn, monkeypatch):
    from mage_bench.eval import generation

    settings = EvalConfig(weights=str(random_digits_cnn))
    assert generation.check_generation_inputs(settings, "digits", ("fid", "kid")) == random_digits_cnn
    seen = []
    real_check = generation.check_generation_inputs
    monkeypatch.setattr(generation, "check_generation_inputs",
                        lambda *a, **k: seen.append(k) or real_check(*a, **k))
    fake = _png_folder(tmp_path / "fake", np.zeros((2, 16, 16, 3), dtype=np.uint8))
    plan = generation.plan_generation(fake, "digits", settings, ("fid",), cache_dir=tmp_path)
    assert plan.weights == random_digits_cnn and plan.extractor.name == "digits-cnn"
    assert seen == [{"allow_download": True}]  # eval fid itself still downloads missing Inception weights
