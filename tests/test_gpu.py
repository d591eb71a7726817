"""The GPU path, checked on a CUDA device (`pytest -m gpu`; `scripts/device-check` runs these on a lent GPU).

Every test carries the `gpu` marker and is skipped where torch sees no CUDA device (conftest), so CI stays
green; the device check counts what passed and what was skipped. Tolerances are stated per test, with why.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


def _objective(name: str, overrides: dict | None = None, seed: int = 0):
    from mage_bench.config import RunConfig, from_dict
    from mage_bench.mage.model import MAGE
    from mage_bench.train import MageObjective

    config = from_dict(RunConfig, {"model": {"name": name, **(overrides or {})}, "masking": {"mask_ratio_min": 0.5}})
    torch.manual_seed(seed)
    return MageObjective(MAGE(config.model), config), config


def _batch(config, batch: int, seed: int = 0):
    from mage_bench.mage.masking import rank_token_masks

    g = torch.Generator().manual_seed(seed)
    L = config.model.num_tokens
    tokens = torch.randint(0, config.model.codebook_size, (batch, L), generator=g)
    ratios = config.masking.distribution.sample(1, g).expand(batch)
    mask, drop = rank_token_masks(ratios, L, 0.5, seed=seed, step=0, view=0, first_row=0)
    return tokens, mask, drop


def test_bf16_training_step_of_vit_base_is_finite_and_close_to_fp32():
    """mage_vit_base_patch16 (batch 16, 256 tokens) under bf16 autocast against fp32 from the same weights and
    batch: the loss within 2% without dropout (bf16 keeps 8 bits of mantissa; the attention logits and softmax
    accumulate in fp32 in SDPA's kernels, the vocabulary logits and the loss are fp32, `objective`; dropout is off
    for the comparison because flash attention draws its dropout differently from the fp32 kernel), then a bf16
    training step with dropout: every gradient finite, the update finite."""
    objective, config = _objective("mage_vit_base_patch16")
    objective = objective.cuda().eval()
    tokens, mask, drop = (t.cuda() for t in _batch(config, 16))
    with torch.no_grad():
        fp32 = objective(tokens, mask, drop)["loss"]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = objective(tokens, mask, drop)["loss"]
    assert torch.isfinite(fp32) and torch.isfinite(bf16)
    assert abs(bf16.item() - fp32.item()) <= 0.02 * abs(fp32.item()), (bf16.item(), fp32.item())
    objective.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = objective(tokens, mask, drop)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in objective.parameters() if p.grad is not None)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1.5e-4)
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in objective.parameters())


def test_generation_on_cuda_gives_the_cpu_tokens():
    """The same weights and decoding noise on CUDA and CPU: at least 99% of the tokens equal (the softmax and
    the matmuls round differently on the two devices, so a draw that lands within ~1e-7 of a code's CDF
    boundary, or a near-tie of confidences, can flip; every later step of that image may then differ)."""
    from mage_bench.mage.generate import decoding_noise, iterative_decode

    objective, config = _objective("mage_tiny")
    model = objective.model.eval()
    noise = decoding_noise(0, range(64), 8, config.model.num_tokens)
    on_cpu = iterative_decode(model, noise, 8, 4.5)
    on_cuda = iterative_decode(model.cuda(), noise.cuda(), 8, 4.5).cpu()
    assert (on_cpu == on_cuda).float().mean().item() >= 0.99


def test_knn_search_on_gpu_equals_cpu():
    """Exact inner-product search (torch on CUDA vs CPU, and faiss's GPU index when faiss has GPUs): the same
    neighbours (random unit vectors: ties have probability ~0) and similarities to 1e-5."""
    from mage_bench.eval import l2_normalise
    from mage_bench.eval.knn import _faiss_neighbours, exact_neighbours

    rng = np.random.default_rng(0)
    database = l2_normalise(rng.standard_normal((5000, 128))).astype(np.float32)
    queries = l2_normalise(rng.standard_normal((300, 128))).astype(np.float32)
    sims_cpu, idx_cpu = exact_neighbours(database, queries, 20, device="cpu")
    sims_gpu, idx_gpu = exact_neighbours(database, queries, 20, device="cuda")
    assert np.array_equal(idx_cpu, idx_gpu) and np.allclose(sims_cpu, sims_gpu, atol=1e-5)
    import faiss

    if faiss.get_num_gpus() > 0:
        sims_f, idx_f = _faiss_neighbours(database, queries, 20)
        assert np.array_equal(idx_cpu, idx_f) and np.allclose(sims_cpu, sims_f, atol=1e-5)


def test_fid_on_cuda_equals_cpu(tmp_path):
    """FID (torch-fidelity, a random-weight Inception made here) of the same two image folders on CUDA and
    CPU: within 1% (cuDNN may run the convolutions in TF32, which rounds the 2048-d features at ~1e-3)."""
    from PIL import Image

    from mage_bench.config import EvalConfig
    from mage_bench.eval.extractors import write_random_inception_weights
    from mage_bench.eval.generation import evaluate_generation

    weights = write_random_inception_weights(tmp_path / "inception.pth")
    rng = np.random.default_rng(0)
    for name, shift in (("a", 0), ("b", 40)):
        (tmp_path / name).mkdir()
        for i in range(48):
            pixels = np.clip(rng.integers(0, 216, (64, 64, 3)) + shift, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i:03d}.png")
    values = {}
    for device in ("cpu", "cuda"):
        settings = EvalConfig(extractor="inception-v3", weights=str(weights), device=device)
        records = evaluate_generation(str(tmp_path / "a"), str(tmp_path / "b"), settings,
                                      cache_dir=tmp_path / f"cache-{device}")
        values[device] = records[0]["value"]
    assert values["cpu"] > 0 and abs(values["cuda"] - values["cpu"]) <= 0.01 * values["cpu"], values


def test_torchrun_on_cuda_trains_and_resumes(tmp_path, tiny_tokenizer_dir):
    """`torchrun --nproc_per_node 1` on the GPU: 4 steps straight, and 2 + resume to 4, give the same weights
    to 1e-5 (GPU kernels such as the embedding backward may sum in a different order between runs: not
    bitwise), and the resumed log has each step once. One process joins no process group (`setup_runtime`
    forms one, nccl on GPUs, from 2 processes, and one GPU cannot host two nccl ranks): the nccl all-reduce
    itself is exercised on machines with 2+ GPUs only."""
    from conftest import TINY_MODEL

    script = tmp_path / "job.py"
    layer = {"tokenizer": str(tiny_tokenizer_dir), "model": dict(TINY_MODEL),
             "train": {"steps": 4, "batch_size": 16, "blr": 0.01, "warmup_steps": 2, "checkpoint_every": 2,
                       "log_every": 1, "device": "cuda", "proxy_every": 0}}
    script.write_text(
        "import json, sys\n"
        "from mage_bench.config import RunConfig, resolve_config\n"
        "from mage_bench.train import train\n"
        f"config = resolve_config(RunConfig, json.loads({json.dumps(json.dumps(layer))}))\n"
        f"train(config, {str(tmp_path / 'straight')!r}, progress=False)\n"
        f"train(config, {str(tmp_path / 'resumed')!r}, progress=False, stop_at=2)\n"
        f"train(config, {str(tmp_path / 'resumed')!r}, resume=True, progress=False)\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(script)]
    subprocess.run(command, check=True, timeout=300, cwd=tmp_path)
    from mage_bench.io import safe_torch_load

    a = safe_torch_load(tmp_path / "straight" / "checkpoint.pt")["model"]
    b = safe_torch_load(tmp_path / "resumed" / "checkpoint.pt")["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert all(r["peak_memory_gb"] > 0 for r in lines)  # GPU runs log their allocator high-water mark


def test_a_compiled_training_step_matches_eager():
    """torch.compile of the objective (inductor) against eager on the same weights and batch, fp32: loss and
    gradients within 1e-4 relative (the fused kernels reorder float sums)."""
    objective, config = _objective("mage_tiny")
    objective = objective.cuda().eval()  # no dropout: the two runs see the same function
    tokens, mask, drop = (t.cuda() for t in _batch(config, 32))
    eager = objective(tokens, mask, drop)["loss"]
    eager.backward()
    grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
    objective.zero_grad(set_to_none=True)
    compiled = torch.compile(objective)(tokens, mask, drop)["loss"]
    compiled.backward()
    assert torch.allclose(compiled, eager, rtol=1e-4), (compiled.item(), eager.item())
    for name, grad in grads.items():
        other = dict(objective.named_parameters())[name].grad
        assert torch.allclose(other, grad, rtol=1e-3, atol=1e-6), name
