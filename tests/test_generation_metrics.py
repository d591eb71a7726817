"""FID/IS/KID/PR through torch-fidelity and clean-fid, the digits-cnn extractor, and their bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mage_bench.cli import main
from mage_bench.config import DataConfig
from mage_bench.errors import UserError
from mage_bench.eval.extractors import (
    DIGITS_CNN_MIN_ACCURACY,
    load_digits_cnn,
)
from mage_bench.eval.fid import frechet_distance
from mage_bench.eval.generation import evaluate_generation as _evaluate_generation
from mage_bench.eval.image_sets import dataset_reference, scan_folder


def evaluate_generation(fake, real, metrics=("fid",), cache_dir=None, **settings):
    """The library call with its settings as an EvalConfig (what the CLI and sweeps build)."""
    from mage_bench.config import EvalConfig

    return _evaluate_generation(fake, real, EvalConfig(**settings), metrics, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights the test makes (meaningless values, real code path)."""
    from mage_bench.eval.extractors import write_random_inception_weights

    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "inception-random.pth")


def _folder(path, images, mode="RGB"):
    path.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(images):
        image = Image.fromarray(array)
        image.convert(mode).save(path / f"{i:04d}.png")
    return path


def _smooth_images(n, size, seed):
    """Images with large smooth structure, so random Inception features differ between them."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
    return [np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR)) for a in small]


@pytest.fixture(scope="session")
def image_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    a = _folder(root / "a", _smooth_images(12, 32, seed=1))
    b = _folder(root / "b", _smooth_images(12, 32, seed=2))
    return a, b


@pytest.fixture(scope="session")
def digits_folders(tmp_path_factory):
    """The digits test split as PNG files (the reference is the train split)."""
    cache = tmp_path_factory.mktemp("cache")
    test = dataset_reference(DataConfig(), "test", cache).folder
    return test, cache


# --------------------------------------------------------------------------------------------
# Inception through both backends (test-made weights)


@pytest.mark.parametrize("backend", ["torch-fidelity", "clean-fid"])
def test_inception_fid_end_to_end_on_folders(backend, image_folders, inception_weights, tmp_path):
    a, b = image_folders
    common = dict(extractor="inception-v3", backend=backend, weights=str(inception_weights), cache_dir=tmp_path)
    same = evaluate_generation(a, str(a), **common)
    other = evaluate_generation(a, str(b), **common)
    assert same[0]["metric"] == "fid" and same[0]["feature_extractor"] == "inception-v3"
    assert same[0]["standard_extractor"] is True and same[0]["backend"] == backend
    assert abs(same[0]["value"]) < 1e-2 * other[0]["value"]
    assert other[0]["value"] > 0 and same[0]["n_samples"] == 12 and same[0]["n_real"] == 12


def test_torch_fidelity_inception_computes_is_kid_and_prc(image_folders, inception_weights, tmp_path):
    a, b = image_folders
    records = evaluate_generation(a, str(b), metrics=("fid", "isc", "kid", "prc"), extractor="inception-v3",
                                  weights=str(inception_weights), cache_dir=tmp_path)
    by_metric = {r["metric"]: r for r in records}
    assert set(by_metric) == {"fid", "is", "kid", "precision", "recall"}
    assert by_metric["is"]["value"] >= 1.0 and "std" in by_metric["is"]
    assert by_metric["kid"]["kid_subset_size"] == 12  # fewer images than KID's default 1000: documented clamp
    assert 0.0 <= by_metric["precision"]["value"] <= 1.0


def test_missing_inception_weights_is_one_line(image_folders, tmp_path, capsys):
    a, _ = image_folders
    code = main(["eval", "fid", "--real", str(a), "--fake", str(a), "--weights", str(tmp_path / "absent.pth"),
                 "--cache", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--weights" in err and err.count("\n") == 1


def test_is_on_fewer_images_than_its_splits_is_a_one_line_error(image_folders, inception_weights, tmp_path, capsys):
    """Found by running the paper preset at toy scale: 4 samples made IS's 10 splits empty, which came out
    as NaN blamed on the features."""
    a, b = image_folders
    few = _folder(tmp_path / "few", _smooth_images(4, 32, seed=3))
    code = main(["eval", "fid", "--real", str(b), "--fake", str(few), "--extractor", "inception-v3", "--weights",
                 str(inception_weights), "--isc", "--cache", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "IS needs at least 10 generated images" in err and err.count("\n") == 1


def test_unsafe_inception_weights_are_refused(image_folders, tmp_path, capsys):
    a, _ = image_folders
    bad = tmp_path / "pickled.pth"
    torch.save({"not": object()}, bad)  # needs weights_only=False to load: never executed
    code = main(["eval", "fid", "--real", str(a), "--fake", str(a), "--weights", str(bad), "--cache", str(tmp_path)])
    assert code == 2 and "not a safe Inception state_dict" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# digits-cnn


def test_digits_cnn_is_accurate_and_seeded(digits_cnn):
    weights, card = digits_cnn
    assert card["test_accuracy"] >= DIGITS_CNN_MIN_ACCURACY and card["seed"] == 0
    assert (weights.parent / "card.json").is_file()
    saved = json.loads((weights.parent / "card.json").read_text())
    assert saved["sha256"] == card["sha256"]
    net = load_digits_cnn(weights)
    features, logits = net(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    assert features.shape == (2, 64) and logits.shape == (2, 10)


@pytest.mark.parametrize("backend", ["torch-fidelity", "clean-fid"])
def test_digits_cnn_fd_agrees_with_our_frechet_on_its_features(backend, digits_cnn, digits_folders):
    weights, _ = digits_cnn
    test_folder, cache = digits_folders
    records = evaluate_generation(test_folder, "digits", metrics=("fid", "kid"), extractor="digits-cnn",
                                  weights=str(weights), backend=backend, cache_dir=cache)
    fd = next(r for r in records if r["metric"] == "fid")
    assert fd["feature_extractor"] == "digits-cnn" and fd["standard_extractor"] is False
    assert fd["n_samples"] == 360 and fd["n_real"] == 1437 and fd["split"] == "train"

    def features(folder):
        net = load_digits_cnn(weights)
        files = sorted(folder.glob("*.png"))
        images = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                              for f in files])
        with torch.no_grad():
            return net(images)[0].double().numpy()

    real_folder = dataset_reference(DataConfig(), "train", cache).folder
    expected = frechet_distance(features(test_folder), features(real_folder))
    assert fd["value"] == pytest.approx(expected, rel=1e-4)  # float32 features, different sqrtm
    assert 0 < fd["value"] < 5  # held-out real digits are close to the reference


def test_reference_statistics_are_cached_and_reused(digits_cnn, digits_folders, monkeypatch):
    weights, _ = digits_cnn
    test_folder, cache = digits_folders
    evaluate_generation(test_folder, "digits", extractor="digits-cnn", weights=str(weights), cache_dir=cache)
    entries = sorted(p.name for p in (cache / "torch-fidelity").iterdir())
    assert any(name.startswith("mage-bench-ref-") for name in entries)
    # Second call: the reference folder must not be read again (only the fake side is).
    import torch_fidelity.datasets as datasets

    read = []
    original = datasets.ImagesPathDataset.__getitem__
    monkeypatch.setattr(datasets.ImagesPathDataset, "__getitem__",
                        lambda self, i: read.append(self.files[i]) or original(self, i))
    again = evaluate_generation(test_folder, "digits", extractor="digits-cnn", weights=str(weights), cache_dir=cache)
    assert read and all(str(test_folder) in f for f in read)
    assert again[0]["value"] > 0


def test_grayscale_and_rgba_images_are_converted_to_rgb(digits_cnn, digits_folders, tmp_path):
    weights, _ = digits_cnn
    test_folder, cache = digits_folders
    images = [np.array(Image.open(f)) for f in sorted(test_folder.glob("*.png"))[:60]]
    rgb = _folder(tmp_path / "rgb", images)
    grey = _folder(tmp_path / "grey", images, mode="L")  # digits are grey already: same pixels
    rgba = _folder(tmp_path / "rgba", images, mode="RGBA")
    values = [evaluate_generation(folder, "digits", extractor="digits-cnn", weights=str(weights),
                                  cache_dir=cache)[0]["value"] for folder in (rgb, grey, rgba)]
    assert values[0] == pytest.approx(values[1], rel=1e-6) and values[0] == pytest.approx(values[2], rel=1e-6)


def test_eval_fid_cli_on_a_run_writes_records(tmp_path, tiny_run_layer, digits_cnn, digits_folders, capsys):
    from mage_bench.config import RunConfig, resolve_config
    from mage_bench.train import train

    weights, _ = digits_cnn
    _, cache = digits_folders
    train(resolve_config(RunConfig, tiny_run_layer), tmp_path / "run", progress=False)
    code = main(["eval", "fid", "--real", "digits", "--fake", str(tmp_path / "run"), "--num", "24", "--isc",
                 "--kid", "--prc", "--weights", str(weights), "--cache", str(cache), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    records = json.loads(out)
    assert {r["metric"] for r in records} == {"fid", "is", "kid", "precision", "recall"}
    assert all(r["feature_extractor"] == "digits-cnn" and r["n_samples"] == 24 for r in records)
    assert json.loads((tmp_path / "run" / "eval" / "fid.json").read_text()) == records
    assert len(list((tmp_path / "run" / "samples").glob("0*.png"))) == 24
    # Human output never calls digits-cnn numbers FID or IS.
    assert main(["eval", "fid", "--real", "digits", "--fake", str(tmp_path / "run"), "--num", "24", "--isc",
                 "--weights", str(weights), "--cache", str(cache)]) == 0
    human = capsys.readouterr().out
    assert "FD (digits-cnn; not Inception)" in human and "IS (digits-cnn; not Inception)" in human
    assert "FID" not in human


# --------------------------------------------------------------------------------------------
# Bad input


def test_mixed_sizes_and_empty_folders_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written into the checkout (e.g. models/digits-cnn)
    mixed = tmp_path / "mixed"
    _folder(mixed, _smooth_images(2, 16, seed=0))
    Image.fromarray(_smooth_images(1, 32, seed=1)[0]).save(mixed / "zz.png")
    (tmp_path / "empty").mkdir()
    for fake, message in [(mixed, "mixes image sizes"), (tmp_path / "empty", "holds no images"),
                          (tmp_path / "absent", "is not a folder")]:
        code = main(["eval", "fid", "--real", "digits", "--fake", str(fake), "--cache", str(tmp_path / "c")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "models").exists()  # the folder checks come before the extractor is prepared


def test_unreadable_image_and_bad_choices(tmp_path, capsys):
    broken = _folder(tmp_path / "broken", _smooth_images(2, 16, seed=0))
    (broken / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="not a readable image"):
        scan_folder(broken)
    for argv, message in [(["--backend", "clean-fids"], "did you mean"), (["--extractor", "vgg"], "feature extractor"),
                          (["--backend", "clean-fid", "--isc"], "clean-fid computes fid, kid only")]:
        good = _folder(tmp_path / "good", _smooth_images(3, 16, seed=0))
        code = main(["eval", "fid", "--real", str(good), "--fake", str(good), "--cache", str(tmp_path / "c"), *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_nan_features_are_one_line_errors(digits_cnn, digits_folders, tmp_path, capsys):
    weights, _ = digits_cnn
    test_folder, cache = digits_folders
    state = torch.load(weights, weights_only=True)
    state["model"]["penultimate.bias"][:] = float("nan")
    broken = tmp_path / "nan.pt"
    torch.save(state, broken)
    code = main(["eval", "fid", "--real", "digits", "--fake", str(test_folder), "--extractor", "digits-cnn",
                 "--weights", str(broken), "--cache", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "NaN" in err and err.count("\n") == 1, err


def test_eval_all_writes_every_record_from_one_feature_pass(tmp_path, tiny_run_layer, digits_cnn, digits_folders,
                                                            capsys):
    from mage_bench.config import RunConfig, resolve_config
    from mage_bench.results import REQUIRED, read_records
    from mage_bench.train import train

    weights, _ = digits_cnn
    _, cache = digits_folders
    run = tmp_path / "run"
    train(resolve_config(RunConfig, tiny_run_layer), run, progress=False)
    code = main(["eval", "all", "--run", str(run), "--num", "40", "--weights", str(weights), "--cache", str(cache),
                 "--kid", "--json"])  # --kid is part of eval all already: computed once
    written = json.loads(capsys.readouterr().out)
    assert code == 0 and set(written) == {"linear", "fewshot", "knn", "fid"}
    for name in written:
        records = read_records(run / "eval" / f"{name}.json")
        assert records == written[name] and all(set(REQUIRED) <= set(r) for r in records)
    assert sorted(r["metric"] for r in written["fid"]) == ["fid", "is", "kid"]
    assert {r["metric"] for r in written["knn"]} >= {"top1", "top5", "map_at_r", "precision_at_10"}
    assert all(r["feature_extractor"] == "mage-probe" for r in written["linear"])
    # One feature pass: one cached array per split, shared by linear, few-shot and kNN.
    assert len(list((run / "eval" / "cache").glob("features-*.labels.npy"))) == 2


def test_no_inception_weights_and_no_internet_says_where_to_put_them(tmp_path, monkeypatch):
    import urllib.error

    from mage_bench.eval.extractors import INCEPTION_ENV, INCEPTION_FILE, resolve_inception_weights

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as info:
        resolve_inception_weights(None)
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / INCEPTION_FILE) in message and "--weights" in message
    assert "\n" not in message


# --------------------------------------------------------------------------------------------
# --compare-backends: the libraries against each other on the same images and Inception


@pytest.fixture(scope="session")
def inception_size_folders(tmp_path_factory):
    """Images already at Inception's 299 px: no backend resizes them (6 a side: Inception on CPU is slow)."""
    root = tmp_path_factory.mktemp("images299")
    return _folder(root / "a", _smooth_images(6, 299, seed=1)), _folder(root / "b", _smooth_images(6, 299, seed=2))


def test_backends_agree_on_images_at_the_extractors_size(inception_size_folders, inception_weights, tmp_path):
    """torch-fidelity, clean-fid and clean-fid-legacy run the same Inception on 299 px images that none of them
    resizes: FID within 1e-6 relative and KID within 1e-6 (measured: 5e-8 and 1.4e-7; float rounding of the
    network's batches). On images of another size they differ by how each resizes to 299 px (TF1-style bilinear
    on uint8, PIL bicubic on float, torch bilinear): on 32 px images, measured once, torch-fidelity's FID came
    out 7% above clean-fid's and clean-fid-legacy's 0.7% below it (`fid_backends`)."""
    from mage_bench.config import EvalConfig
    from mage_bench.eval.generation import compare_backends

    a, b = inception_size_folders
    result = compare_backends(a, str(b), EvalConfig(extractor="inception-v3", weights=str(inception_weights)),
                              ("fid", "kid"), cache_dir=tmp_path)
    assert set(result["backends"]) == {"torch-fidelity", "clean-fid", "clean-fid-legacy"}
    fid = result["backends"]["torch-fidelity"]["fid"]
    assert fid > 0 and result["fake_size"] == result["real_size"] == "299x299"
    for pair, diff in result["differences"]["fid"].items():
        assert abs(diff) <= 1e-6 * fid, pair
    for pair, diff in result["differences"]["kid"].items():
        assert abs(diff) <= 1e-6, pair


def test_compare_backends_on_the_command_line(inception_size_folders, inception_weights, tmp_path, capsys,
                                             monkeypatch):
    """The flag's plumbing and its refusals (the comparison itself is the test above: clean-fid's 2048-d matrix
    square root costs ~10 s a backend on 2 cores, so it is not run twice)."""
    import json

    import mage_bench.eval.generation as generation

    a, b = inception_size_folders
    calls = []
    document = {"backends": {"torch-fidelity": {"fid": 1.5}, "clean-fid": {"fid": 1.25}},
                "differences": {"fid": {"torch-fidelity - clean-fid": 0.25}}, "extractor": "inception-v3",
                "standard_extractor": True, "n_samples": 6, "n_real": 6, "fake_size": "299x299",
                "real_size": "299x299", "dataset": str(b), "split": "folder"}
    monkeypatch.setattr(generation, "compare_backends", lambda *args, **kwargs: calls.append(args) or document)
    common = ["eval", "fid", "--real", str(b), "--fake", str(a), "--weights", str(inception_weights),
              "--cache", str(tmp_path)]
    assert main([*common, "--compare-backends", "--json", "--kid"]) == 0
    assert json.loads(capsys.readouterr().out) == document
    assert calls[0][0] == str(a) and calls[0][1] == str(b) and calls[0][3] == ("fid", "kid")
    assert main([*common, "--compare-backends"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("torch-fidelity: fid 1.5\nclean-fid: fid 1.25\nfid torch-fidelity - clean-fid: +0.25\n")
    assert "resize" in out
    for extra, message in [(["--isc"], "compares fid and kid"), (["--backend", "clean-fid"], "drop --backend")]:
        assert main([*common, "--compare-backends", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert main(["eval", "knn", "--run", str(tmp_path), "--compare-backends"]) == 2
    assert "applies to `eval fid` only" in capsys.readouterr().err
    assert len(calls) == 2  # the refused ones computed nothing


# --------------------------------------------------------------------------------------------
# Published reference statistics (.npz with mu and sigma) as the real side


def test_fid_against_a_statistics_file_equals_fid_against_its_images(image_folders, inception_weights, tmp_path):
    """Statistics made from folder b's features (torch-fidelity's reader, network and FID layer), saved as an
    ADM-style .npz: FID of folder a against the file equals torch-fidelity's FID of a against b's images."""
    from mage_bench.eval.extractors import FID_EXTRACTORS
    from mage_bench.eval.fid import feature_statistics
    from mage_bench.eval.statistics import fake_features
    from mage_bench.io import sha256_file

    a, b = image_folders
    features = fake_features(tuple(sorted(b.glob("*.png"))), FID_EXTRACTORS.get("inception-v3"), inception_weights,
                             "cpu", False)
    mu, sigma = feature_statistics(features)
    stats = tmp_path / "VIRTUAL_reference.npz"
    np.savez(stats, mu=mu, sigma=sigma, arr_0=np.zeros((2, 4, 4, 3), np.uint8))  # arr_0: an ADM batch's images
    common = dict(extractor="inception-v3", weights=str(inception_weights), cache_dir=tmp_path)
    (from_file,) = evaluate_generation(a, str(stats), **common)
    (from_images,) = evaluate_generation(a, str(b), **common)
    # The same features and moments; torch-fidelity takes scipy's sqrtm of the rank-deficient (12 < 2048) product
    # where we take symmetric eigendecompositions (`eval.fid`): measured 7e-6 apart.
    assert from_file["value"] == pytest.approx(from_images["value"], rel=1e-4)
    assert from_file["split"] == "statistics" and from_file["reference_sha256"] == sha256_file(stats)
    assert from_file["dataset"] == str(stats) and from_file["n_samples"] == 12


def test_bad_statistics_files_and_flags_are_one_line_errors(image_folders, inception_weights, tmp_path, capsys):
    a, _ = image_folders
    no_sigma = tmp_path / "no-sigma.npz"
    np.savez(no_sigma, mu=np.zeros(2048))
    narrow = tmp_path / "narrow.npz"
    np.savez(narrow, mu=np.zeros(64), sigma=np.eye(64))
    good = tmp_path / "good.npz"
    np.savez(good, mu=np.zeros(2048), sigma=np.eye(2048))
    base = ["eval", "fid", "--fake", str(a), "--weights", str(inception_weights), "--cache", str(tmp_path)]
    for real, extra, message in [(no_sigma, [], "not `mu` and `sigma`"),
                                 (narrow, [], "holds 64-d statistics, but inception-v3 gives 2048-d"),
                                 (good, ["--kid"], "gives FID only"),
                                 (good, ["--backend", "clean-fid"], "drop --backend")]:
        assert main([*base, "--real", str(real), *extra]) == 2, real
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main([*base, "--real", str(good), "--compare-backends"]) == 2
    assert "give the reference folder" in capsys.readouterr().err
