"""Evaluation at ImageNet scale, shown on small data: the GPU kNN search limit, one kNN search for every k,
feature batches sized by resolution and a cache keyed on the data set's identity, the torch linear probe,
and resuming an evaluation without recomputing what was computed from the same inputs."""

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL  # noqa: I001  (tests/ is on the path)

from mage_bench.config import DataConfig, EvalConfig, RunConfig, resolve_config
from mage_bench.errors import UserError
from mage_bench.eval import features, fewshot, knn, linear
from mage_bench.results import read_records


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These tiny models run 10-20x faster on one thread than on two contended cores (measured); the tests
    check behaviour, not speed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    return train_test_split(bunch.data / 16.0, bunch.target, test_size=0.2, stratify=bunch.target, random_state=0)


@pytest.fixture(scope="module")
def clusters():
    """Four classes of 150 noisy 16-d points (no similarity ties), and 60 queries: (db_x, db_y, q_x, q_y)."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 16))
    db_y, q_y = np.repeat(np.arange(4), 150), rng.integers(0, 4, 60)
    return (centres[db_y] + 1.2 * rng.standard_normal((600, 16)), db_y,
            centres[q_y] + 1.2 * rng.standard_normal((60, 16)), q_y)


# --------------------------------------------------------------------------------------------
# kNN: the search limit and one search for every k


def test_search_beyond_a_stand_in_limit_equals_the_uncapped_search(clusters, monkeypatch):
    db_x, db_y, q_x, q_y = clusters
    searched = []
    real_exact = knn.exact_neighbours
    monkeypatch.setattr(knn, "exact_neighbours", lambda *a, **kw: searched.append(a[2]) or real_exact(*a, **kw))
    ks = (10, 20, 100, 200)
    uncapped = knn.knn_evaluate(db_x, db_y, q_x, q_y, ks=ks)
    assert searched == []  # faiss on CPU: no limit
    capped = knn.knn_evaluate(db_x, db_y, q_x, q_y, ks=ks, k_limit=32)
    assert searched == [200]  # one exact search at the largest depth (k = 200 > R = 150)
    assert capped == uncapped
    assert capped[1]["map_at_r"] > 0.3 and capped[1]["queries"] == 60  # R = 150 > the cap, not truncated
    # The public single-purpose functions take the same stand-in.
    assert knn.retrieval_metrics(db_x, db_y, q_x, q_y, k_limit=32) == knn.retrieval_metrics(db_x, db_y, q_x, q_y)
    assert knn.knn_classify(db_x, db_y, q_x, q_y, k=100, k_limit=32) == knn.knn_classify(db_x, db_y, q_x, q_y, k=100)


def test_the_gpu_limit_applies_whenever_faiss_is_on_a_gpu(clusters, monkeypatch):
    db_x, db_y, q_x, q_y = clusters
    assert knn.search_k_limit() is None and knn.search_k_limit(7) == 7
    monkeypatch.setattr(knn, "_faiss_on_gpu", lambda: True)
    assert knn.search_k_limit() == knn.GPU_SEARCH_K_LIMIT == 2048
    monkeypatch.setattr(knn, "GPU_SEARCH_K_LIMIT", 50)  # a GPU index's limit, scaled down to this data

    def refuse(database, queries, k):
        raise AssertionError(f"faiss asked for k = {k} above the GPU limit")

    real_faiss = knn._faiss_neighbours
    monkeypatch.setattr(knn, "_faiss_neighbours", lambda d, q, k: refuse(d, q, k) if k > 50 else real_faiss(d, q, k))
    sims, idx = knn.nearest_neighbours(db_x.astype(np.float32), q_x.astype(np.float32), 150)
    assert sims.shape == idx.shape == (60, 150) and (np.diff(sims, axis=1) <= 0).all()
    assert knn.nearest_neighbours(db_x, q_x, 40)[0].shape == (60, 40)  # within the limit: faiss
    retrieval = knn.retrieval_metrics(db_x, db_y, q_x, q_y)
    monkeypatch.setattr(knn, "_faiss_on_gpu", lambda: False)
    monkeypatch.setattr(knn, "_faiss_neighbours", real_faiss)
    assert retrieval == knn.retrieval_metrics(db_x, db_y, q_x, q_y)


def test_one_search_gives_each_ks_numbers_of_a_search_per_k(digits, monkeypatch):
    train_x, test_x, train_y, test_y = digits
    ks = (10, 20, 100, 200, 5000)  # 5000: clamped to the training size, as knn_classify does
    per_k = [knn.knn_classify(train_x, train_y, test_x, test_y, k=k) for k in ks]
    retrieval = knn.retrieval_metrics(train_x, train_y, test_x, test_y)
    calls = []
    real = knn.nearest_neighbours
    monkeypatch.setattr(knn, "nearest_neighbours", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    results, retrieval_once = knn.knn_evaluate(train_x, train_y, test_x, test_y, ks=ks)
    assert calls == [len(train_x)]  # one search, at the largest k needed
    assert results == per_k and retrieval_once == retrieval  # bitwise, on data with duplicate images
    assert [r["k"] for r in results] == [10, 20, 100, 200, len(train_x)]


# --------------------------------------------------------------------------------------------
# The linear probe's torch solver


def test_torch_linear_probe_is_close_to_scikit_learn_and_seeded(digits):
    train_x, test_x, train_y, test_y = digits
    sklearn_result = linear.linear_probe(train_x, train_y, test_x, test_y, solver="sklearn")
    torch_result = linear.linear_probe(train_x, train_y, test_x, test_y, solver="torch", device="cpu")
    assert sklearn_result["solver"] == "sklearn-lbfgs" and torch_result["solver"] == "torch-lbfgs"
    assert torch_result["top1"] >= 0.94 and abs(torch_result["top1"] - sklearn_result["top1"]) <= 0.03
    assert torch_result["top5"] >= torch_result["top1"] and torch_result["C"] in linear.C_GRID
    assert linear.linear_probe(train_x, train_y, test_x, test_y, solver="torch") == torch_result


def test_auto_solver_takes_torch_only_for_large_data(digits, monkeypatch):
    train_x, test_x, train_y, test_y = digits
    assert linear.choose_solver("auto", 1_281_167, 1000) == "torch"  # ImageNet
    assert linear.choose_solver("auto", 50_000, 100) == "sklearn"  # CIFAR-100
    assert linear.linear_probe(train_x, train_y, test_x, test_y)["solver"] == "sklearn-lbfgs"  # digits
    with pytest.raises(UserError, match="unknown solver 'newton'; use one of auto, sklearn, torch"):
        linear.linear_probe(train_x, train_y, test_x, test_y, solver="newton")
    monkeypatch.setattr(linear, "TORCH_SOLVER_FROM", 1000)
    bad = train_x.copy()
    bad[[3, 9]] = np.nan
    with pytest.raises(UserError, match="2 feature rows contain NaN"):  # checked in blocks, same message
        linear.linear_probe(bad, train_y, test_x, test_y)


# --------------------------------------------------------------------------------------------
# Features: batches sized by resolution, a cache keyed on the data set


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_tokenizer_dir):
    from mage_bench.train import train

    layer = {"tokenizer": str(tiny_tokenizer_dir), "model": dict(TINY_MODEL),
             "train": {"steps": 4, "batch_size": 16, "blr": 0.01, "proxy_every": 0, "warmup_steps": 2, "checkpoint_every": 4,
                       "log_every": 1}}
    out = tmp_path_factory.mktemp("scale") / "run"
    train(resolve_config(RunConfig, layer), out, progress=False)
    return out


@pytest.fixture
def run(trained_run, tmp_path):
    return shutil.copytree(trained_run, tmp_path / "run")


def _image_folder(root, seed: int) -> None:
    """root/data/x/{train,val}/{a,b}/*.png: 16 px images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", 3), ("val", 2)):
        for label in ("a", "b"):
            (root / "data" / "x" / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "data" / "x" / split / label / f"{i}.png")


def test_feature_batches_follow_the_settings_and_stay_out_of_the_cache_key(run, tmp_path, monkeypatch):
    from mage_bench.eval.runner import evaluate_run

    data = DataConfig()
    default, _, info = features.extract_features(run, data, "test", cache_dir=tmp_path / "a")
    assert info["batch_size"] == EvalConfig().feature_batch_size(16) == 256
    small, _, small_info = features.extract_features(run, data, "test", batch_size=70, cache_dir=tmp_path / "b")
    assert small_info["cache_key"] == info["cache_key"] and np.abs(np.asarray(small) - default).max() < 1e-5
    assert small_info["batch_size"] == 70 and not small_info["cached"]
    assert features.extract_features(run, data, "test", batch_size=70, cache_dir=tmp_path / "a")[2]["cached"]
    assert EvalConfig().feature_batch_size(256) == 64  # 2^22 pixels per batch above 128 px

    sizes = []
    real = features.probe_views
    monkeypatch.setattr(features, "probe_views", lambda r, images, views: sizes.append(len(images)) or real(r, images,
                                                                                                           views))
    evaluate_run(run, ["knn"], EvalConfig(batch_size=100, knn_ks=(5,)), cache_dir=tmp_path / "c")
    assert max(sizes) == 100 and sum(sizes) == 1437 + 360  # both splits, in batches of the setting


def test_feature_cache_tells_two_folders_of_one_relative_name_apart(run, tmp_path, monkeypatch):
    for place, seed in (("here", 0), ("there", 1)):
        _image_folder(tmp_path / place, seed)
    data = DataConfig(name="imagefolder:data/x", image_size=16)
    monkeypatch.chdir(tmp_path / "here")
    first, _, info = features.extract_features(run, data, "train", cache_dir=tmp_path / "cache")
    monkeypatch.chdir(tmp_path / "there")
    second, _, other = features.extract_features(run, data, "train", cache_dir=tmp_path / "cache")
    assert not other["cached"] and other["cache_key"] != info["cache_key"]
    assert str(tmp_path / "there") in other["dataset_identity"] and not np.allclose(first, second)
    assert features.extract_features(run, data, "train", cache_dir=tmp_path / "cache")[2]["cached"]


def test_mae_probe_encodes_in_batches_of_the_feature_batch_size(run, tmp_path, monkeypatch):
    from mage_bench.eval.runner import evaluate_run

    _image_folder(tmp_path, 0)
    sizes = []
    real = features.probe_features
    monkeypatch.setattr(features, "probe_features", lambda r, images: sizes.append(len(images)) or real(r, images))
    settings = EvalConfig(batch_size=4, probe_epochs=1, probe_batch_size=6)
    evaluate_run(run, ["linear-mae"], settings, data_name=f"imagefolder:{tmp_path / 'data' / 'x'}")
    assert sizes == [4, 2, 4]  # training head batch of 6 -> 4 + 2; the 4 test images -> 4


# --------------------------------------------------------------------------------------------
# Resume


class Counted:
    """A stand-in for an evaluator's function: counts calls, forwards to the real one unless `refuse`."""

    def __init__(self, real):
        self.real, self.calls, self.refuse = real, 0, False

    def __call__(self, *args, **kwargs):
        if self.refuse:
            raise AssertionError(f"{self.real.__name__} recomputed on resume")
        self.calls += 1
        return self.real(*args, **kwargs)


@pytest.fixture
def counted(monkeypatch):
    spies = {"linear": Counted(linear.linear_probe), "fewshot": Counted(fewshot.few_shot),
             "knn": Counted(knn.knn_evaluate), "features": Counted(features.extract_views)}
    monkeypatch.setattr(linear, "linear_probe", spies["linear"])
    monkeypatch.setattr(fewshot, "few_shot", spies["fewshot"])
    monkeypatch.setattr(knn, "knn_evaluate", spies["knn"])
    monkeypatch.setattr(features, "extract_views", spies["features"])
    return spies


FAST = EvalConfig(knn_ks=(5, 10), fewshot_shots=(1,), fewshot_draws=2, device="cpu")


def test_resume_reads_back_what_was_computed_from_the_same_inputs(run, counted):
    from mage_bench.eval.runner import EVAL_ALL, evaluate_run

    first = evaluate_run(run, list(EVAL_ALL), FAST, resume=True)
    assert {name: spy.calls for name, spy in counted.items()} == {"linear": 1, "fewshot": 1, "knn": 1, "features": 2}
    assert sorted(p.name for p in (run / "eval" / "inputs").iterdir()) == ["fewshot.json", "knn.json", "linear.json"]
    for spy in counted.values():
        spy.refuse = True
    assert evaluate_run(run, list(EVAL_ALL), FAST, resume=True) == first  # nothing computed, not even features

    # Another kNN setting: kNN alone is recomputed (on the cached features).
    counted["knn"].refuse = counted["features"].refuse = False
    again = evaluate_run(run, list(EVAL_ALL), dataclasses.replace(FAST, knn_ks=(5, 20)), resume=True)
    assert counted["knn"].calls == 2 and again["linear"] == first["linear"] and again["fewshot"] == first["fewshot"]
    assert sorted({r["k"] for r in read_records(run / "eval" / "knn.json") if "k" in r}) == [5, 20]

    # No inputs file (records from before resume existed, or a crash before it was written): recomputed.
    (run / "eval" / "inputs" / "knn.json").unlink()
    evaluate_run(run, ["knn"], dataclasses.replace(FAST, knn_ks=(5, 20)), resume=True)
    assert counted["knn"].calls == 3
    counted["linear"].refuse = False
    evaluate_run(run, ["linear"], FAST)  # without resume: always computed
    assert counted["linear"].calls == 2


def test_evaluate_all_resume_skips_fid_with_matching_inputs(run, counted, monkeypatch):
    from mage_bench.eval import generation
    from mage_bench.eval.fid_backends import METRICS
    from mage_bench.eval.runner import evaluate_all
    from mage_bench.results import RecordContext, build_records, write_records

    flags_seen = []

    def fake_generation(run, real, settings, flags, cache_dir=None, progress=False, sweep=None, samples=None):
        flags_seen.append(tuple(flags))
        context = RecordContext(evaluator="fid", run=run.path.name, dataset=real, split=settings.real_split,
                                feature_extractor="digits-cnn", n_samples=settings.num_samples, seed=0,
                                config_hash=None, sweep=sweep)
        records = build_records(context, METRICS, [("fid", 12.5, {})])
        write_records(run.path / "eval" / "fid.json", records)
        return [r.as_dict() for r in records]

    monkeypatch.setattr(generation, "evaluate_generation", fake_generation)
    first = evaluate_all(run, FAST, flags=("fid",), sweep="s", resume=True)
    assert flags_seen == [("fid",)] and first["fid"][0]["value"] == 12.5 and first["fid"][0]["n_samples"] == 1437
    for spy in counted.values():
        spy.refuse = True
    assert evaluate_all(run, FAST, flags=("fid",), sweep="s", resume=True) == first
    assert flags_seen == [("fid",)]  # fid not recomputed either
    evaluate_all(run, FAST, flags=("fid", "kid"), sweep="s", resume=True)  # other metric flags: fid again only
    assert flags_seen == [("fid",), ("fid", "kid")]


def test_writing_records_removes_their_inputs_file(tmp_path):
    """Whoever rewrites RUN/eval/NAME.json (`eval fid` on a sweep run, say), the old inputs file no longer
    vouches for it, so a later resume recomputes instead of reading back records of other inputs."""
    from mage_bench.results import write_records
    from mage_bench.runs import records_inputs_file

    records = tmp_path / "eval" / "fid.json"
    inputs = records_inputs_file(records)
    inputs.parent.mkdir(parents=True)
    inputs.write_text("{}")
    write_records(records, [])
    assert records.is_file() and not inputs.exists()
