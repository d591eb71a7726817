import torch

from mage_bench.bench import analytic_train_flops, bench_model, format_table, matmul_peak
from mage_bench.config import ModelConfig, from_dict


def test_counted_flops_agree_with_the_formula(tiny_model_overrides):
    result = bench_model("mage_tiny", batch_size=4, steps=1, device=torch.device("cpu"), peak=1e11,
                         overrides=tiny_model_overrides)
    cfg = from_dict(ModelConfig, {"name": "mage_tiny", **tiny_model_overrides})
    assert result.flops_per_step == analytic_train_flops(cfg, 4, n_drop=32)
    # FlopCounterMode sees every matmul; on CPU it does not see the flash-attention kernel.
    without_attention = analytic_train_flops(cfg, 4, n_drop=32, attention=False)
    assert min(abs(result.counted_flops - without_attention), abs(result.counted_flops - result.flops_per_step)) \
        < 0.01 * result.flops_per_step
    assert result.step_s > 0 and result.mfu > 0
    assert "mage_tiny" in format_table([result])


def test_matmul_peak_is_positive():
    assert matmul_peak(torch.device("cpu"), torch.float32, sizes=(64,), repeats=1) > 0


def test_bench_knn_compares_the_same_search_on_small_sizes():
    from mage_bench.bench_eval import bench_knn

    result = bench_knn(n_database=600, n_queries=40, dim=16, k=5)
    assert result["same_neighbours"] == 1.0  # faiss and scikit-learn found the same neighbours
    assert result["floor_s"] > 0 and result["faiss_s"] > 0 and result["speedup"] > 0


def test_bench_train_json_is_one_document_with_its_command(capsys, monkeypatch):
    import json

    import mage_bench.bench as bench
    from mage_bench.cli import main

    monkeypatch.setattr(bench, "matmul_peak", lambda device, dtype: 1e11)  # the peak's big matmuls take seconds
    assert main(["bench", "train", "--models", "mage_tiny", "--batch-size", "8", "--steps", "2", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["command"] == "mage-bench bench train --models mage_tiny --batch-size 8 --steps 2 --device cpu"
    (row,) = document["models"]
    assert row["model"] == "mage_tiny" and row["batch_size"] == 8 and row["compiled"] is False
    assert row["images_per_s"] > 0 and row["mfu"] > 0 and row["peak_gflops"] == 100.0
    assert row["peak_memory_gb"] is None  # CPU: no allocator high-water mark
    assert main(["bench", "train", "--models", "mage_tiny", "--batch-size", "8", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "eager" in out and out.rstrip().endswith("(command: mage-bench bench train --models mage_tiny "
                                                     "--batch-size 8 --steps 1 --device cpu)")
    assert main(["bench", "train", "--models", "mage_tinyy"]) == 2  # a typo: one line, exit 2
    assert "mage_tinyy" in capsys.readouterr().err


def test_bench_train_side_by_side_sums_the_workers(capsys, monkeypatch):
    """--workers 2 --threads 1: two spawned processes time the step together; the row holds both workers'
    images and FLOPs over their common step, so its images/s is the sum of theirs."""
    import json

    import mage_bench.bench as bench
    from mage_bench.cli import main

    monkeypatch.setattr(bench, "matmul_peak", lambda device, dtype: 1e11)  # the workers get the parent's peak
    args = ["bench", "train", "--models", "mage_tiny", "--batch-size", "8", "--steps", "2"]
    assert main([*args, "--workers", "2", "--threads", "1", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["command"].endswith("--steps 2 --device cpu --workers 2 --threads 1")
    (row,) = document["models"]
    assert row["workers"] == 2 and row["threads"] == 1 and row["batch_size"] == 16 and row["peak_gflops"] == 100.0
    assert abs(row["images_per_s"] - 16 / row["step_s"]) < 1e-6 * row["images_per_s"] and row["mfu"] > 0
    single = bench.bench_model("mage_tiny", 8, 1, torch.device("cpu"), 1e11)
    assert row["gflops_per_step"] == 2 * single.flops_per_step / 1e9
    assert main([*args, "--threads", "1"]) == 0
    assert "eager 1x1t" in capsys.readouterr().out
    for bad, message in (["--workers", "0"], "positive integers"), (["--threads", "0"], "positive integers"):
        assert main([*args, *bad]) == 2 and message in capsys.readouterr().err
