"""Evaluation profiles: pinned protocols, one cached feature pass, metrics against independent references,
bootstrap intervals, statistics files, the CLI and the report's separation of profiles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mage_bench.cli import main
from mage_bench.config import DataConfig
from mage_bench.errors import UserError
from mage_bench.eval.image_sets import dataset_reference
from mage_bench.eval.profiles import PROFILES, load_profile, profile_from_yaml

FAST = {"bootstrap": 20, "kid_subsets": 10}  # a user profile's fast settings for tests


def _yaml(path, **fields):
    import yaml

    path.write_text(yaml.safe_dump(fields))
    return path


def _trained_run(path, layer):
    """A tiny digits run trained for the layer's few steps (each test gets its own folder to fill)."""
    from mage_bench.config import RunConfig, resolve_config
    from mage_bench.train import train

    train(resolve_config(RunConfig, layer), path, progress=False)
    return path


@pytest.fixture(scope="module")
def digits_sets(tmp_path_factory):
    """The digits test split as PNGs (the generated side in these tests) and the cache holding it."""
    cache = tmp_path_factory.mktemp("cache")
    return dataset_reference(DataConfig(), "test", cache).folder, cache


@pytest.fixture(scope="module")
def fast_digits(tmp_path_factory):
    return _yaml(tmp_path_factory.mktemp("profiles") / "fast-digits.yaml", base="digits", **FAST)


# --------------------------------------------------------------------------------------------
# Profiles as data


def test_builtin_profiles_validate_and_hash_only_pinned_settings():
    import dataclasses

    assert set(PROFILES) >= {"mage-paper", "adm", "dgm-eval", "cmmd", "digits"}
    paper = PROFILES.get("mage-paper")
    assert (paper.extractor, paper.metrics, paper.num_samples, paper.image_size) == ("inception-v3", ("fid", "is"),
                                                                                      50_000, 256)
    assert (paper.decode_steps, paper.decode_temperature, paper.image_format) == (20, 6.0, "png")
    assert PROFILES.get("dgm-eval").extractor == "dinov2-vit-l-14"
    assert PROFILES.get("cmmd").extractor == "clip-vit-l-14-336px"
    renamed = dataclasses.replace(paper, name="other", description="same numbers")
    assert renamed.hash == paper.hash  # name and description change no number
    assert dataclasses.replace(paper, decode_temperature=4.5).hash != paper.hash
    assert len({PROFILES.get(n).hash for n in PROFILES}) == len(PROFILES)


def test_user_profile_from_yaml_with_a_base(tmp_path, monkeypatch):
    path = _yaml(tmp_path / "mine.yaml", base="digits", dc_k=7, bootstrap=0)
    profile = profile_from_yaml(path)
    assert (profile.name, profile.dc_k, profile.bootstrap, profile.extractor) == ("mine", 7, 0, "digits-cnn")
    assert "dc_k: 7" in profile.description and profile.hash != PROFILES.get("digits").hash
    monkeypatch.setenv("MAGE_BENCH_PROFILES", str(tmp_path))
    assert load_profile("mine") == profile  # found by name in a profile folder
    assert load_profile(str(path)) == profile


@pytest.mark.parametrize("fields, words", [
    ({"base": "digits", "name": "digits"}, "built-in"),
    ({"base": "digits", "metrics": ["fid", "fidd"]}, "did you mean 'fid'"),
    ({"extractor": "dinov2-vit-l-14", "metrics": ["is"]}, "IS needs a classifier"),
    ({"base": "digits", "reference": "statistics", "reference_data": ""}, "not is, kid or cmmd"),
    ({"base": "digits", "image_format": "jpg"}, "LTH14/mage#8"),
    ({"base": "digits", "bootstrap": 3}, "bootstrap"),
    ({"metrics": ["fid"]}, "lacks `extractor`"),
])
def test_bad_user_profiles_are_one_line_errors(tmp_path, fields, words):
    with pytest.raises(UserError) as info:
        profile_from_yaml(_yaml(tmp_path / "bad.yaml", **fields))
    assert words in str(info.value) and "\n" not in str(info.value)


def test_unknown_profile_names_the_choices():
    with pytest.raises(UserError, match="choose one of: adm, cmmd, dgm-eval, digits, mage-paper"):
        load_profile("digit")


# --------------------------------------------------------------------------------------------
# Metrics against independent references


def test_digits_profile_metrics_agree_with_torch_fidelity_and_prdc(digits_sets, digits_cnn, fast_digits):
    import prdc as prdc_package
    import torch_fidelity

    from mage_bench.eval.extractors import register_with_torch_fidelity
    from mage_bench.eval.feature_sets import FEATURES_DIR
    from mage_bench.eval.profile_eval import evaluate_profile

    fake, cache = digits_sets
    weights, _ = digits_cnn
    records = {r["metric"]: r for r in evaluate_profile(fake, "digits", str(fast_digits),
                                                         weights=str(weights), cache_dir=cache)}
    assert list(records) == ["fid", "is", "kid", "precision", "recall", "density", "coverage"]
    first = records["fid"]
    assert first["profile"] == "fast-digits" and first["profile_hash"] == load_profile(str(fast_digits)).hash
    assert (first["n_samples"], first["n_real"], first["feature_extractor"]) == (360, 1437, "digits-cnn")
    assert first["standard_extractor"] is False and first["backend"] == "torch-fidelity features"

    register_with_torch_fidelity()
    real = dataset_reference(DataConfig(), "train", cache).folder
    reference = torch_fidelity.calculate_metrics(
        input1=str(fake), input2=str(real), fid=True, kid=True, isc=True, prc=True, prc_neighborhood=3, cuda=False,
        feature_extractor="digits-cnn",
        feature_extractor_weights_path=str(weights), kid_subset_size=360, kid_subsets=10, rng_seed=0,
        save_cpu_ram=True, verbose=False)
    assert records["fid"]["value"] == pytest.approx(reference["frechet_inception_distance"], rel=1e-6)
    assert records["kid"]["value"] == pytest.approx(reference["kernel_inception_distance_mean"], rel=1e-9)
    assert records["kid"]["std"] == pytest.approx(reference["kernel_inception_distance_std"], rel=1e-9)
    assert records["is"]["value"] == pytest.approx(reference["inception_score_mean"], rel=1e-9)
    # torch-fidelity counts a sample on a ball's edge as inside, prdc as outside: the same counts without repeated
    # features (its shares are float32 means: 1e-6 is far below one sample in 360)
    assert records["precision"]["value"] == pytest.approx(reference["precision"], abs=1e-6)
    assert records["recall"]["value"] == pytest.approx(reference["recall"], abs=1e-6)

    # PRDC against the prdc package on the cached features (k=3 for precision/recall, k=5 for density/coverage)
    features = {json.loads((d / "meta.json").read_text())["images"].split(":")[0]: np.load(d / "features.npy")
                for d in (cache / FEATURES_DIR).iterdir()}
    fake_x, real_x = features["folder"], features["dataset"]
    at3 = prdc_package.compute_prdc(real_features=real_x, fake_features=fake_x, nearest_k=3)
    at5 = prdc_package.compute_prdc(real_features=real_x, fake_features=fake_x, nearest_k=5)
    for metric, expected in (("precision", at3), ("recall", at3), ("density", at5), ("coverage", at5)):
        assert records[metric]["value"] == pytest.approx(expected[metric], abs=1e-12), metric
    # Every interval holds its estimate; the seed spread of IS/KID stays their own `std`
    for metric in ("fid", "kid", "precision", "recall", "density", "coverage"):
        r = records[metric]
        assert r["ci_low"] <= r["value"] <= r["ci_high"] and r["bootstrap"] == 20, metric
    assert "ci_low" not in records["is"]


def test_a_second_profile_with_the_same_extractor_reads_the_features_back(tmp_path, digits_sets, digits_cnn,
                                                                          fast_digits):
    from mage_bench.eval.profile_eval import evaluate_profile

    fake, _ = digits_sets
    weights, _ = digits_cnn
    cache = tmp_path / "cache"
    first = evaluate_profile(fake, "digits", str(fast_digits), weights=str(weights), cache_dir=cache)
    assert first[0]["fake_features_cached"] is False and first[0]["real_features_cached"] is False
    other = _yaml(tmp_path / "prdc-only.yaml", base="digits", metrics=["precision", "recall"], bootstrap=0)
    second = evaluate_profile(fake, "digits", str(other), weights=str(weights), cache_dir=cache)
    assert second[0]["fake_features_cached"] is True and second[0]["real_features_cached"] is True
    assert [r["value"] for r in second] == [r["value"] for r in first if r["metric"] in ("precision", "recall")]
    assert second[0]["profile_hash"] != first[0]["profile_hash"] and "ci_low" not in second[0]


def test_bootstrap_shortcuts_equal_recomputing_on_each_resample():
    from mage_bench.eval.cmmd import cmmd, cmmd_resampled
    from mage_bench.eval.profile_metrics import _polynomial_mmd_resampled

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 6)), rng.normal(size=(25, 6)) + 0.4
    ix, iy = rng.integers(0, 30, size=(4, 30)), rng.integers(0, 25, size=(4, 25))
    cx = np.stack([np.bincount(r, minlength=30) for r in ix])
    cy = np.stack([np.bincount(r, minlength=25) for r in iy])
    assert cmmd_resampled(x, y, cx, cy) == pytest.approx([cmmd(x[a], y[b]) for a, b in zip(ix, iy, strict=True)], rel=1e-9)

    def unbiased_poly_mmd(a, b):
        d = a.shape[1]
        kxx, kyy, kxy = (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3
        n, m = len(a), len(b)
        return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                - 2 * kxy.mean())

    expected = [unbiased_poly_mmd(x[a], y[b]) for a, b in zip(ix, iy, strict=True)]
    assert _polynomial_mmd_resampled(x, y, cx, cy) == pytest.approx(expected, rel=1e-9)


def test_bootstrap_is_seeded_and_says_how_far_resampling_moves_fd(digits_sets, digits_cnn, fast_digits):
    from mage_bench.eval.profile_eval import evaluate_profile

    fake, cache = digits_sets
    weights, _ = digits_cnn
    a = evaluate_profile(fake, "digits", str(fast_digits), weights=str(weights), cache_dir=cache)
    b = evaluate_profile(fake, "digits", str(fast_digits), weights=str(weights), cache_dir=cache)
    keys = ("value", "ci_low", "ci_high", "bootstrap_shift")
    assert [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]
    fd = a[0]
    # Test vs train split of one distribution: resampling adds FD's small-sample bias again (a positive shift)
    assert fd["metric"] == "fid" and fd["bootstrap_shift"] > 0


# --------------------------------------------------------------------------------------------
# Statistics files (`eval stats`, ADM-style batches)


def test_eval_stats_file_as_the_reference_gives_the_same_numbers(tmp_path, digits_sets, digits_cnn, capsys):
    fake, cache = digits_sets
    weights, _ = digits_cnn
    stats = tmp_path / "digits-train.npz"
    assert main(["eval", "stats", "--real", "digits", "--extractor", "digits-cnn", "--weights", str(weights),
                 "--out", str(stats), "--cache", str(cache), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == 1437 and summary["feature_dim"] == 64
    with np.load(stats) as data:
        assert set(data.files) >= {"mu", "sigma", "activations", "extractor", "weights_sha256"}
    by_images = _yaml(tmp_path / "by-images.yaml", base="digits", metrics=["fid", "precision", "recall"],
                      bootstrap=0)
    by_stats = _yaml(tmp_path / "by-stats.yaml", base="digits", metrics=["fid", "precision", "recall"],
                     bootstrap=0, reference="statistics", reference_data="")
    args = ["eval", "fid", "--fake", str(fake), "--weights", str(weights), "--cache", str(cache), "--json"]
    assert main([*args, "--profile", str(by_images), "--real", "digits"]) == 0
    images = json.loads(capsys.readouterr().out)
    assert main([*args, "--profile", str(by_stats), "--real", str(stats)]) == 0
    statistics = json.loads(capsys.readouterr().out)
    assert [r["value"] for r in statistics] == pytest.approx([r["value"] for r in images], rel=1e-9)
    assert statistics[0]["split"] == "statistics" and len(statistics[0]["reference_sha256"]) == 64
    # torch-fidelity's own statistics format (its cache's .pt: a dict of NumPy arrays) as the reference of FD
    from torch_fidelity.utils_torch import torch_atomic_save

    with np.load(stats) as data:
        torch_atomic_save({"mu": data["mu"], "sigma": data["sigma"]}, str(tmp_path / "digits-train.pt"))
    fd_only = _yaml(tmp_path / "fd-stats.yaml", base="digits", metrics=["fid"], bootstrap=0, reference="statistics",
                    reference_data="")
    assert main([*args, "--profile", str(fd_only), "--real", str(tmp_path / "digits-train.pt")]) == 0
    assert json.loads(capsys.readouterr().out)[0]["value"] == pytest.approx(images[0]["value"], rel=1e-9)
    torch.save({"mu": np.zeros(3), "sigma": Image.new("RGB", (1, 1))}, tmp_path / "code.pt")  # not plain arrays
    assert main([*args, "--profile", str(fd_only), "--real", str(tmp_path / "code.pt")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_adm_style_batch_gives_precision_from_its_images_and_refuses_other_networks(tmp_path, digits_sets,
                                                                                   digits_cnn):
    from mage_bench.eval.profile_eval import evaluate_profile

    fake, cache = digits_sets
    weights, _ = digits_cnn
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(fake.glob("*.png"))[:100]])
    batch = tmp_path / "batch.npz"
    rng = np.random.default_rng(0)
    np.savez(batch, arr_0=images, mu=rng.normal(size=64), sigma=np.eye(64))
    profile = _yaml(tmp_path / "adm-digits.yaml", base="digits", metrics=["fid", "precision", "recall"],
                    bootstrap=0, reference="statistics", reference_data="")
    records = evaluate_profile(fake, str(batch), str(profile), weights=str(weights), cache_dir=cache)
    assert records[0]["n_real"] == 100 and records[1]["metric"] == "precision"
    # An eval-stats file of another extractor is refused, not compared
    other = tmp_path / "other.npz"
    np.savez(other, mu=np.zeros(64), sigma=np.eye(64), activations=np.zeros((5, 64), np.float32),
             extractor=np.array("inception-v3"), weights_sha256=np.array("0" * 64))
    with pytest.raises(UserError, match="inception-v3 statistics"):
        evaluate_profile(fake, str(other), str(profile), weights=str(weights), cache_dir=cache)
    other_weights = tmp_path / "other-weights.npz"
    np.savez(other_weights, mu=np.zeros(64), sigma=np.eye(64), extractor=np.array("digits-cnn"),
             weights_sha256=np.array("0" * 64))
    fd_only = _yaml(tmp_path / "fd-only.yaml", base="digits", metrics=["fid"], bootstrap=0, reference="statistics",
                    reference_data="")
    with pytest.raises(UserError, match="was made with digits-cnn weights 000000000000"):
        evaluate_profile(fake, str(other_weights), str(fd_only), weights=str(weights), cache_dir=cache)
    no_images = tmp_path / "moments.npz"
    np.savez(no_images, mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(UserError, match="LTH14/mar#91"):
        evaluate_profile(fake, str(no_images), str(profile), weights=str(weights), cache_dir=cache)


# --------------------------------------------------------------------------------------------
# What a profile pins is checked before any feature


def test_pinned_format_size_count_and_weights_are_enforced(tmp_path, digits_cnn):
    from mage_bench.eval.extractors import write_random_inception_weights
    from mage_bench.eval.profile_eval import evaluate_profile

    weights, _ = digits_cnn
    rng = np.random.default_rng(0)
    real, fake = tmp_path / "real", tmp_path / "fake"
    for folder, suffix in ((real, "jpg"), (fake, "png")):
        folder.mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.{suffix}")
    folder_profile = _yaml(tmp_path / "f.yaml", base="digits", reference="folder", reference_data="",
                           image_size=16, bootstrap=0, metrics=["fid"])
    with pytest.raises(UserError, match="non-PNG files.*LTH14/mage#8"):
        evaluate_profile(fake, str(real), str(folder_profile), weights=str(weights), cache_dir=tmp_path / "c")
    sized = _yaml(tmp_path / "s.yaml", base="digits", reference="folder", reference_data="", image_size=32,
                  bootstrap=0, metrics=["fid"])
    with pytest.raises(UserError, match="16x16 images; profile s pins 32x32"):
        evaluate_profile(fake, str(fake), str(sized), weights=str(weights), cache_dir=tmp_path / "c")
    counted = _yaml(tmp_path / "n.yaml", base="digits", reference="folder", reference_data="", num_samples=50,
                    bootstrap=0, metrics=["fid"])
    with pytest.raises(UserError, match="holds 6 images; profile n pins 50"):
        evaluate_profile(fake, str(fake), str(counted), weights=str(weights), cache_dir=tmp_path / "c")
    # mage-paper pins the Inception file's sha256: random weights are refused before any image is read
    random = write_random_inception_weights(tmp_path / "random-inception.pth")
    with pytest.raises(UserError, match="is not the inception-v3 weights profile mage-paper pins"):
        evaluate_profile(fake, str(fake), "mage-paper", weights=str(random), cache_dir=tmp_path / "c")
    with pytest.raises(UserError, match="give it with --real DIR"):
        evaluate_profile(fake, None, "mage-paper", weights=str(random), cache_dir=tmp_path / "c")


def test_inception_profile_fd_is_torch_fidelitys_fid(tmp_path):
    import torch_fidelity

    from mage_bench.eval.extractors import write_random_inception_weights
    from mage_bench.eval.profile_eval import evaluate_profile

    weights = write_random_inception_weights(tmp_path / "inception.pth")
    rng = np.random.default_rng(1)
    folders = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(12):
            small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            Image.fromarray(small).resize((32, 32), Image.BILINEAR).save(folder / f"{i}.png")
        folders.append(folder)
    profile = _yaml(tmp_path / "paper-small.yaml", base="mage-paper", weights_sha256="", num_samples=12, num_real=12,
                    image_size=32, metrics=["fid", "is"])
    records = evaluate_profile(folders[0], str(folders[1]), str(profile), weights=str(weights),
                               cache_dir=tmp_path / "c")
    reference = torch_fidelity.calculate_metrics(
        input1=str(folders[0]), input2=str(folders[1]), fid=True, isc=True, cuda=False, isc_splits=10, rng_seed=0,
        feature_extractor_weights_path=str(weights), save_cpu_ram=True, verbose=False)
    # 12 images in 2048 dimensions: rank-deficient covariances, where torch-fidelity's general eigensolver keeps
    # round-off eigenvalues that ours sets to 0 (`fid._psd_eigenvalues`): agreement to 1e-4 here, 1e-6 on the
    # full-rank digits features above.
    assert records[0]["value"] == pytest.approx(reference["frechet_inception_distance"], rel=1e-4)
    assert records[1]["value"] == pytest.approx(reference["inception_score_mean"], rel=1e-9)
    assert records[0]["standard_extractor"] is True and records[0]["real_size"] == "32x32"


# --------------------------------------------------------------------------------------------
# CLI and runs


def test_cli_profiles_listing_and_refused_flags(capsys, digits_sets):
    fake, _ = digits_sets
    assert main(["eval", "profiles", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed["digits"]["hash"] == PROFILES.get("digits").hash and listed["digits"]["source"] == "built-in"
    assert main(["eval", "profiles"]) == 0
    assert "mage-paper v1 [" in capsys.readouterr().out
    for extra, words in ((["--kid"], "--kid is pinned by --profile digits"),
                         (["--num-samples", "10"], "--num-samples is pinned"),
                         (["--extractor", "inception-v3"], "--extractor is pinned")):
        assert main(["eval", "fid", "--profile", "digits", "--fake", str(fake), *extra]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    assert main(["eval", "linear", "--run", "x", "--profile", "digits"]) == 2
    assert "--profile applies to `eval fid` and `eval all`" in capsys.readouterr().err
    assert main(["eval", "profiles", "--kid"]) == 2
    assert "--kid does not apply to `eval profiles`" in capsys.readouterr().err


def test_eval_all_under_a_profile_writes_its_own_records_and_resumes(tmp_path, tiny_run_layer, digits_cnn,
                                                                     digits_sets, capsys):
    from mage_bench.results import read_records

    weights, _ = digits_cnn
    _, cache = digits_sets
    run = _trained_run(tmp_path / "run", tiny_run_layer)
    profile = _yaml(tmp_path / "few.yaml", base="digits", num_samples=40, decode_steps=4, decode_temperature=2.0,
                    metrics=["fid", "precision", "recall"], bootstrap=0)
    args = ["eval", "all", "--run", str(run), "--profile", str(profile), "--weights", str(weights), "--cache",
            str(cache), "--json"]
    assert main(args) == 0
    written = json.loads(capsys.readouterr().out)
    assert set(written) == {"linear", "fewshot", "knn", "fid-few"}
    records = read_records(run / "eval" / "fid-few.json")
    assert records == written["fid-few"] and not (run / "eval" / "fid.json").exists()
    assert (records[0]["decode_steps"], records[0]["decode_temperature"], records[0]["n_samples"]) == (4, 2.0, 40)
    assert len(list((run / "samples-s4-t2").glob("0*.png"))) == 40  # not the run's own decoding settings
    assert main([*args, "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["fid-few"] == records  # read back, not recomputed
    # A profile whose reference must be given with --real cannot drive `eval all`
    assert main(["eval", "all", "--run", str(run), "--profile", "mage-paper"]) == 2
    assert "`eval all` and sweeps evaluate against the run's data set" in capsys.readouterr().err


def test_eval_config_refuses_settings_a_profile_pins():
    from mage_bench.config import EvalConfig

    with pytest.raises(UserError, match="eval.extractor is pinned by eval.profile"):
        EvalConfig(profile="digits", extractor="inception-v3").validate("eval")
    EvalConfig(profile="digits", weights="w.pt").validate("eval")  # where the weights lie is not pinned


# --------------------------------------------------------------------------------------------
# The report keeps profiles apart


def test_report_never_puts_two_profiles_in_one_column():
    import pandas as pd

    from mage_bench.report.collate import headlines, summarise
    from mage_bench.report.tables import summary_table

    rows = []
    for profile, value in ((None, 10.0), ("digits", 0.5), ("dgm-eval", 300.0)):
        for seed in (0, 1):
            rows.append({"role": "run", "point": "p", "run": f"r{seed}", "evaluator": "fid", "metric": "fid",
                         "value": value + seed, "higher_is_better": False, "n_samples": 10, "seed": seed,
                         "feature_extractor": "digits-cnn", "profile": profile,
                         "ci_low": None if profile is None else value - 1,
                         "ci_high": None if profile is None else value + 1})
    results = pd.DataFrame(rows)
    keys = [h.key for h in headlines(results) if h.metric == "fid"]
    assert keys == ["fid", "fid@digits", "fid@dgm-eval"]
    table = summary_table(results, ["p"], [])
    labels = [c["label"] for c in table["columns"]]
    assert len(labels) == 3 and "profile digits" in labels[1] and "profile" not in labels[0]
    cells = [c["text"] for c in table["rows"][0]["cells"]]
    assert cells[0] == "10.500 ± 0.707" and cells[1] == "1.000 ± 0.707 (CI ±1)"
    summary = summarise(results)
    assert len(summary) == 3 and set(summary["count"]) == {2}
    # One name with two hashes (an edited user YAML) is two protocols: two columns, told apart by the hash
    rows = [{**r, "profile_hash": "aaaa1111" if r["seed"] == 0 else "bbbb2222"} for r in rows if r["profile"]]
    edited = pd.DataFrame(rows)
    keys = [h.key for h in headlines(edited) if h.metric == "fid"]
    assert keys == ["fid@digits[aaaa1111]", "fid@digits[bbbb2222]", "fid@dgm-eval[aaaa1111]",
                    "fid@dgm-eval[bbbb2222]"]
    labels = [c["label"] for c in summary_table(edited, ["p"], [])["columns"]]
    assert any("profile digits [aaaa1111]" in label for label in labels)
    # Decode-grid records alone give no headline column and no trade-off axis
    grid_only = pd.DataFrame([{**r, "decode_grid": True} for r in rows])
    assert summary_table(grid_only, ["p"], [])["columns"] == []


def test_report_builds_from_fid_against_moments_only(tmp_path):
    from mage_bench.report import build_report

    record = {"sweep": None, "run": "r", "evaluator": "fid", "metric": "fid", "value": 3.0, "higher_is_better": False,
              "n_samples": 10, "dataset": "ref.npz", "split": "statistics", "feature_extractor": "inception-v3",
              "seed": 0, "config_hash": None, "git_commit": None, "versions": {}, "created_at": "now",
              "profile": "moments", "profile_hash": "abcd", "n_real": None, "standard_extractor": True}
    (tmp_path / "r" / "eval").mkdir(parents=True)
    (tmp_path / "r" / "eval" / "fid-moments.json").write_text(json.dumps([record]))
    assert "profile moments" in build_report([tmp_path / "r"], tmp_path / "report").read_text()


def test_cmmd_is_named_cmmd_only_on_clip_features():
    from mage_bench.eval.runner import metric_of

    cmmd = metric_of("fid", "cmmd")
    assert cmmd.display({"clip-vit-l-14-336px"}, standard=False) == "CMMD"
    assert cmmd.display({"digits-cnn"}, standard=False) == "MMD (digits-cnn; not CLIP ViT-L/14-336)"


def test_feature_cache_is_keyed_on_the_weights(tmp_path, digits_sets, digits_cnn):
    from mage_bench.eval.extractors import FID_EXTRACTORS
    from mage_bench.eval.feature_sets import ImageSource, image_features
    from mage_bench.eval.image_sets import scan_folder

    fake, _ = digits_sets
    weights, _ = digits_cnn
    source = ImageSource.of_images(scan_folder(fake))
    extractor = FID_EXTRACTORS.get("digits-cnn")
    a = image_features(source, extractor, weights, "a" * 64, "cpu", tmp_path)
    b = image_features(source, extractor, weights, "a" * 64, "cpu", tmp_path)
    c = image_features(source, extractor, weights, "b" * 64, "cpu", tmp_path)
    assert a.extracted and not b.extracted and c.extracted and a.folder != c.folder
    assert isinstance(b.features, np.memmap) and b.logits.shape == (360, 10)
    assert torch.equal(torch.from_numpy(np.array(a.features)), torch.from_numpy(np.array(b.features)))


def test_a_sweep_under_a_profile_reports_its_columns_apart(tmp_path, tiny_tokenizer_dir, digits_cnn, capsys):
    import pandas as pd
    import yaml
    from conftest import chromium_figures
    from test_sweep import micro_spec

    path = micro_spec(tmp_path, tiny_tokenizer_dir, digits_cnn, seeds=(0, 1))
    spec = yaml.safe_load(path.read_text())
    profile = _yaml(tmp_path / "sweep-digits.yaml", base="digits", num_samples=16, bootstrap=10, kid_subsets=5,
                    metrics=["fid", "kid", "precision", "recall", "density", "coverage"])
    del spec["eval"]["num_samples"]  # the profile pins it
    spec["eval"]["profile"] = str(profile)
    spec["eval"]["decode_grid"] = ["temperature=1,3", "steps=2,4"]
    path.write_text(yaml.safe_dump(spec))
    runs, report = tmp_path / "runs", tmp_path / "report"
    assert main(["sweep", str(path), "--runs", str(runs), "--out", str(report)]) == 0
    results = pd.read_csv(report / "results.csv")
    gen = results[results["evaluator"] == "fid"]
    assert set(gen["profile"].dropna()) == {"sweep-digits"} and gen["profile"].notna().all()
    run_rows = gen[(gen["role"] == "run") & gen["decode_grid"].isna()]
    assert len(run_rows) == 2 * 2 * 6 and set(run_rows["n_samples"]) == {16}
    assert run_rows["ci_low"].notna().all()
    assert set(gen[gen["role"] == "reference"]["point"]) == {"reference: untrained model"}  # no floor at 16
    html = (report / "index.html").read_text()
    table = html.split("<h2>Summary")[1].split("</table>")[0]
    assert "FD (digits-cnn; not Inception) (profile sweep-digits)" in table and "(CI ±" in table
    grid = gen[gen["decode_grid"].fillna(False).astype(bool)]
    assert set(grid["decode_temperature"]) == {1.0, 3.0} and set(grid["decode_steps"]) == {2, 4}
    assert len(grid[grid["role"] == "run"]) == 2 * 2 * 4 * 6  # and the untrained model's, like every evaluator
    assert len(run_rows[run_rows["decode_grid"].isna()]) == 2 * 2 * 6
    assert "<h2>Decoding sweep</h2>" in html and "best temperature" in html
    shown = chromium_figures(report / "index.html", tmp_path / "chromium")
    if shown is not None:
        loaded, total, console = shown
        assert loaded == total and not console, console


# --------------------------------------------------------------------------------------------
# Decoding sweeps


def test_decode_grid_parsing_and_its_one_line_errors():
    from mage_bench.eval.decode_grid import parse_decode

    assert parse_decode(["temperature=3,4.5,6", "steps=8,12"]) == {"temperature": (3.0, 4.5, 6.0), "steps": (8, 12)}
    for bad, words in ((["temp=3"], "give temperature="), (["steps=8", "steps=12"], "twice"),
                       (["steps=a"], "must be ints"), (["temperature=3,3"], "a value twice"),
                       (["steps=0"], ">= 1"), (["temperature="], "lists no value"), ([], "at least one")):
        with pytest.raises(UserError, match=words):
            parse_decode(bad)


def test_eval_fid_decode_grid_evaluates_every_setting_once(tmp_path, tiny_run_layer, digits_cnn, digits_sets,
                                                           capsys):
    from mage_bench.config import EvalConfig
    from mage_bench.report import build_report
    from mage_bench.results import read_records

    weights, _ = digits_cnn
    _, cache = digits_sets
    run = _trained_run(tmp_path / "run", tiny_run_layer)
    profile = _yaml(tmp_path / "grid.yaml", base="digits", num_samples=24, metrics=["fid", "precision"], bootstrap=0)
    base = ["eval", "fid", "--fake", str(run), "--weights", str(weights), "--cache", str(cache)]
    assert main([*base, "--decode", "temperature=1,2"]) == 2
    assert "--decode needs --profile NAME" in capsys.readouterr().err
    assert main([*base, "--profile", str(profile), "--decode", "temperature=1,2", "steps=2,3", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    settings = {(r["decode_steps"], r["decode_temperature"]) for r in records}
    assert settings == {(2, 1.0), (2, 2.0), (3, 1.0), (3, 2.0)} and len(records) == 8
    assert {r["profile_hash"] for r in records} == {load_profile(str(profile)).hash}
    assert all(r["decode_grid"] is True and r["n_samples"] == 24 for r in records)
    assert read_records(run / "eval" / "fid-grid-decode.json") == records
    assert sorted(p.name for p in run.glob("samples-*")) == ["samples-s2-t1", "samples-s2-t2", "samples-s3-t1",
                                                             "samples-s3-t2"]
    # The report draws them apart from the headline columns
    assert main(["eval", "fid", "--fake", str(run), "--profile", str(profile), "--weights", str(weights),
                 "--cache", str(cache)]) == 0
    capsys.readouterr()
    index = build_report([run], tmp_path / "report")
    html = index.read_text()
    assert "<h2>Decoding sweep</h2>" in html
    table = html.split("<h2>Summary")[1].split("</table>")[0]
    assert table.count("(profile grid)") == 1  # one FD column: the profile's own decoding only
    with pytest.raises(UserError, match="decode_grid needs eval.profile"):
        EvalConfig(decode_grid=("temperature=1",)).validate("eval")


def test_streamed_samples_give_the_features_of_their_png_files(tmp_path, tiny_run_layer, digits_cnn, digits_sets,
                                                                capsys):
    from mage_bench.eval.profile_eval import evaluate_profile

    weights, _ = digits_cnn
    _, cache = digits_sets
    run = _trained_run(tmp_path / "run", tiny_run_layer)
    profile = _yaml(tmp_path / "stream.yaml", base="digits", num_samples=70, decode_temperature=1.5, bootstrap=10,
                    kid_subsets=5, metrics=["fid", "is", "kid", "precision", "density"])
    streamed = evaluate_profile(run, "digits", str(profile), weights=str(weights), cache_dir=cache, stream=True)
    assert not list(run.glob("samples*")) and streamed[0]["samples_streamed"] is True  # no PNG written
    written = evaluate_profile(run, "digits", str(profile), weights=str(weights), cache_dir=cache)
    assert len(list((run / "samples-s12-t1.5").glob("0*.png"))) == 70 and written[0]["samples_streamed"] is False
    assert not written[0]["fake_features_cached"]  # the PNG folder is another image set: extracted again
    keys = ("metric", "value", "std", "ci_low", "ci_high")
    assert [[r.get(k) for k in keys] for r in streamed] == [[r.get(k) for k in keys] for r in written]
    assert main(["eval", "knn", "--run", str(run), "--stream-samples"]) == 2
    assert "--stream-samples applies to `eval fid` and `eval all`" in capsys.readouterr().err
    with pytest.raises(UserError, match="is a folder of images: drop --stream-samples"):
        evaluate_profile(run / "samples-s12-t1.5", "digits", str(profile), weights=str(weights), cache_dir=cache,
                         stream=True)
