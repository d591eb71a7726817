"""`mage-bench bench train`: training throughput, FLOPs per step and MFU, measured in one run.

For each model preset it times full training steps (forward, backward, gradient clipping, AdamW) of the same
objective `mage-bench train` uses, on synthetic tokens with the official masking (truncnorm,
half the tokens dropped). FLOPs per step are counted by torch's FlopCounterMode on one real step
are counted by hand (`analytic_train_flops`: matmuls and attention, forward and backward), and
checked against torch's FlopCounterMode, which sees every matmul but not the CPU flash-attention
kernel; the peak is the best fp32 (bf16 on GPU) matmul rate measured on the same device in the same
process. MFU = achieved FLOP/s / that peak.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch


@dataclass(frozen=True)
class BenchResult:
    model: str
    device: str
    dtype: str
    batch_size: int
    num_tokens: int
    step_s: float
    flops_per_step: float  # by hand, complete
    counted_flops: float  # FlopCounterMode (attention may be missing on CPU)
    peak_flops: float
    peak_memory_gb: float | None = None  # the allocator's high-water mark over the timed steps (GPU only)
    compiled: bool = False  # the objective through torch.compile (`train.compile`)
    # Runs side by side (the local executor's `workers`), each on `threads` torch threads (None: torch's
    # default): batch_size and flops_per_step are then all workers' together, step_s their common step.
    workers: int = 1
    threads: int | None = None

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.step_s

    @property
    def tokens_per_s(self) -> float:
        return self.batch_size * self.num_tokens / self.step_s

    @property
    def mfu(self) -> float:
        return self.flops_per_step / self.step_s / self.peak_flops

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "device": self.device, "dtype": self.dtype, "batch_size": self.batch_size,
                "step_s": self.step_s, "images_per_s": self.images_per_s, "tokens_per_s": self.tokens_per_s,
                "gflops_per_step": self.flops_per_step / 1e9, "peak_gflops": self.peak_flops / 1e9,
                "mfu": self.mfu, "peak_memory_gb": self.peak_memory_gb, "compiled": self.compiled,
                "workers": self.workers, "threads": self.threads}

    @property
    def mode(self) -> str:
        """'eager', 'compiled', and the layout when it is not one process on torch's default threads."""
        mode = "compiled" if self.compiled else "eager"
        if self.workers > 1 or self.threads is not None:
            mode += f" {self.workers}x{self.threads or '?'}t"
        return mode


def analytic_train_flops(cfg, batch_size: int, n_drop: int, attention: bool = True) -> float:
    """Matmul FLOPs of one training step by hand (a check on FlopCounterMode's count).

    Forward per image: per block 8nD^2 (qkv, proj) + 4rnD^2 (MLP) + 4n^2D (attention); the decoder
    input projection; the MlmLayer. Backward costs twice the forward, except the logits matmul,
    whose weight (the detached word embeddings) gets no gradient: 1x there.
    """
    L, D, Dd, r = cfg.num_tokens, cfg.embed_dim, cfg.decoder_embed_dim, cfg.mlp_ratio
    n_e, n_d = 1 + L - n_drop, 1 + L

    def blocks(depth: int, n: int, d: int) -> float:
        return depth * (8 * n * d * d + 4 * r * n * d * d + (4 * n * n * d if attention else 0))

    trained = blocks(cfg.depth, n_e, D) + 2 * n_e * D * Dd + blocks(cfg.decoder_depth, n_d, Dd) + 2 * n_d * Dd * D
    logits = 2 * n_d * D * cfg.vocab_size
    return batch_size * (3 * trained + 2 * logits)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 4096),
                repeats: int = 5) -> float:
    """Best measured FLOP/s of square matmuls on `device` (the denominator of MFU)."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        _sync(device)
        tic = time.perf_counter()
        for _ in range(repeats):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - tic))
    return best


def bench_model(name: str, batch_size: int, steps: int, device: torch.device, peak: float,
                overrides: dict[str, Any] | None = None, compile: bool = False,
                before_timing: Any = None) -> BenchResult:
    """Times `steps` training steps of preset `name` after 2 warm-up steps (which include the compilation
    with `compile`: the objective through torch.compile, as `train.compile` trains). `before_timing`: called
    between the warm-up and the timed steps (side by side: every worker starts timing together)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mage_bench.config import RunConfig, from_dict
    from mage_bench.mage.masking import rank_token_masks
    from mage_bench.mage.model import MAGE
    from mage_bench.train import MageObjective, param_groups

    torch.set_flush_denormal(True)
    # The official drop share, set: the objective then knows the encoder length, as in training (no host sync).
    config = from_dict(RunConfig, {"model": {"name": name, **(overrides or {})}, "masking": {"mask_ratio_min": 0.5}})
    torch.manual_seed(0)
    objective = MageObjective(MAGE(config.model), config).to(device).train()
    optimizer = torch.optim.AdamW(param_groups(objective, 0.05), lr=1e-4, betas=(0.9, 0.95), foreach=True)  # as train
    L = config.model.num_tokens
    g = torch.Generator().manual_seed(0)
    masking = config.masking.distribution
    amp = device.type == "cuda"

    def batch(step: int):
        tokens = torch.randint(0, config.model.codebook_size, (batch_size, L), generator=g)
        ratios = masking.sample(1, g).expand(batch_size).to(device)
        mask, drop = rank_token_masks(ratios, L, 0.5, seed=0, step=step, view=0, first_row=0)  # as training draws
        return tokens.to(device), mask, drop

    forward = torch.compile(objective) if compile else objective

    def step(tokens, mask, drop, forward=forward):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = forward(tokens, mask, drop)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), 3.0, foreach=True)  # as train
        optimizer.step()

    batches = [batch(step) for step in range(steps + 3)]
    drop_count = batches[0][2][0].sum()
    counter = FlopCounterMode(display=False)
    with counter:  # eager: FlopCounterMode counts the dispatched ops, which a compiled graph hides
        step(*batches[0], forward=objective)
    for b in batches[1:3]:  # warm-up
        step(*b)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if before_timing is not None:
        before_timing()
    tic = time.perf_counter()
    for b in batches[3:]:
        step(*b)
    _sync(device)
    step_s = (time.perf_counter() - tic) / steps
    n_drop = int(drop_count)
    return BenchResult(name, device.type, "bf16-autocast" if amp else "fp32", batch_size, L, step_s,
                       analytic_train_flops(config.model, batch_size, n_drop), float(counter.get_total_flops()), peak,
                       peak_memory_gb(device), compile)


def bench_train(models: list[str], batch_size: int, steps: int, device: str = "cpu",
                compile: bool = False, workers: int = 1, threads: int | None = None) -> list[BenchResult]:
    """Each model's training step on `device`; on the CPU optionally as `workers` runs side by side, each on
    `threads` torch threads (the local executor's layout). MFU is always against the peak of this process on
    torch's default threads: the whole machine's matmul rate."""
    from mage_bench.threads import cpu_threads

    dev = torch.device(device)
    peak = matmul_peak(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if workers > 1:
        return [_side_by_side(name, batch_size, steps, peak, compile, workers, threads) for name in models]
    with cpu_threads(threads):
        return [replace(bench_model(name, batch_size, steps, dev, peak, compile=compile), threads=threads)
                for name in models]


def _side_by_side(name: str, batch_size: int, steps: int, peak: float, compile: bool, workers: int,
                  threads: int | None) -> BenchResult:
    """`workers` spawned processes time the same step at once (a barrier starts their timed steps together);
    the row is their sum: every worker's images per their common step time."""
    import multiprocessing
    import queue

    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(workers), context.Queue()
    processes = [context.Process(target=_bench_worker, daemon=True,
                                 args=(name, batch_size, steps, peak, compile, threads, barrier, results))
                 for _ in range(workers)]
    for process in processes:
        process.start()
    rows: list[Any] = []
    while len(rows) < workers:
        try:
            rows.append(results.get(timeout=1.0))
        except queue.Empty:
            # A worker that put its row exits 0 (its queue flushed first); any other exit lost a row.
            codes = [p.exitcode for p in processes]
            if any(code not in (None, 0) for code in codes) or (None not in codes and results.empty()):
                barrier.abort()
                raise RuntimeError(f"a bench worker of {name} died (exit codes {codes})") from None
    for process in processes:
        process.join()
    errors = [row for row in rows if isinstance(row, str)]
    if errors:
        raise RuntimeError(f"a bench worker of {name} failed: {errors[0]}")
    images_per_s = sum(row.images_per_s for row in rows)
    first = rows[0]
    return replace(first, batch_size=first.batch_size * workers, step_s=first.batch_size * workers / images_per_s,
                   flops_per_step=first.flops_per_step * workers, counted_flops=first.counted_flops * workers,
                   workers=workers, threads=threads)


def _bench_worker(name: str, batch_size: int, steps: int, peak: float, compile: bool, threads: int | None,
                  barrier: Any, results: Any) -> None:
    if threads is not None:  # as the local executor's workers
        from mage_bench.threads import use_threads_from_now

        use_threads_from_now(threads)
    try:
        results.put(bench_model(name, batch_size, steps, torch.device("cpu"), peak, compile=compile,
                                before_timing=barrier.wait))
    except Exception as exc:  # the parent names it; a broken barrier stops the other workers too
        barrier.abort()
        results.put(f"{type(exc).__name__}: {exc}")


def format_table(results: list[BenchResult]) -> str:
    lines = [f"{'model':<24} {'device':<6} {'mode':<11} {'batch':>5} {'step s':>8} {'img/s':>9} {'tok/s':>10} "
             f"{'GFLOP/step':>11} {'peak GFLOP/s':>13} {'MFU':>6}"]
    for r in results:
        lines.append(f"{r.model:<24} {r.device:<6} {r.mode:<11} {r.batch_size:>5} {r.step_s:>8.3f} {r.images_per_s:>9.1f} "
                     f"{r.tokens_per_s:>10.0f} {r.flops_per_step / 1e9:>11.1f} {r.peak_flops / 1e9:>13.1f} "
                     f"{100 * r.mfu:>5.1f}%")
    return "\n".join(lines)


def peak_memory_gb(device: torch.device) -> float | None:
    """The most memory the device's allocator held since the last reset (GPU only; None on CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def _best_rate(run_batch, batches: tuple[int, ...], device: torch.device, repeats: int) -> dict[str, Any]:
    """images/s of `run_batch(b)` at each batch size (one warm-up call, then `repeats` timed), and the best."""
    rates = {}
    for b in batches:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run_batch(b)  # warm-up (kernels chosen, memory allocated)
        _sync(device)
        tic = time.perf_counter()
        for _ in range(repeats):
            run_batch(b)
        _sync(device)
        rates[b] = b * repeats / (time.perf_counter() - tic)
    best = max(rates, key=rates.get)
    return {"images_per_s": rates[best], "best_batch": best, "by_batch": {str(b): r for b, r in rates.items()},
            "peak_memory_gb": peak_memory_gb(device)}


def bench_generate(model: str = "mage_vit_base_patch16", tokenizer: str = "vqgan_mage", steps: int = 20,
                   temperature: float = 6.0, batches: tuple[int, ...] = (64, 128, 256), device: str = "cuda",
                   repeats: int = 2, overrides: dict[str, Any] | None = None, bf16: bool = False) -> dict[str, Any]:
    """Generation throughput: iterative decoding from all-[MASK] (`steps`, `temperature`) plus the VQGAN
    decode to pixels, random weights (the work does not depend on them); fp32 as `generate` runs today, or
    under bf16 autocast (`bf16`, GPU only) to see what it would gain; images/s at each batch size and the best."""
    from mage_bench.config import RunConfig, from_dict
    from mage_bench.mage.generate import decoding_noise, iterative_decode
    from mage_bench.mage.model import MAGE
    from mage_bench.tokenizer import create_tokenizer

    dev = torch.device(device)
    config = from_dict(RunConfig, {"model": {"name": model, **(overrides or {})}})
    torch.manual_seed(0)
    net = MAGE(config.model).to(dev).eval()
    vq = create_tokenizer(tokenizer).to(dev).eval()
    side = int(round(config.model.num_tokens ** 0.5))
    amp = bf16 and dev.type == "cuda"

    def run_batch(b: int) -> None:
        noise = decoding_noise(0, range(b), steps, config.model.num_tokens).to(dev)
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            tokens = iterative_decode(net, noise, steps, temperature)
            vq.decode(tokens.view(-1, side, side))

    out = _best_rate(run_batch, batches, dev, repeats)
    return {"model": model, "tokenizer": tokenizer, "steps": steps, "temperature": temperature,
            "device": dev.type, "dtype": "bf16-autocast" if amp else "fp32", **out}


def bench_inception(weights: str | Any, batches: tuple[int, ...] = (128, 256, 512), size: int = 256,
                    device: str = "cuda", repeats: int = 2) -> dict[str, Any]:
    """Feature-extraction throughput of torch-fidelity's Inception-v3 (its own resize to 299) on uint8
    images of `size` px; `weights` any file in its format (a random one gives the same speed)."""
    from mage_bench.eval.extractors import _inception_network

    dev = torch.device(device)
    net = _inception_network(weights, str(dev))
    generator = torch.Generator().manual_seed(0)

    def run_batch(b: int) -> None:
        images = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=generator).to(dev)
        with torch.no_grad():
            net(images)

    return {"size": size, "device": dev.type, **_best_rate(run_batch, batches, dev, repeats)}


def projected_fid_seconds(generate_ips: float, extract_ips: float, num_generated: int = 50_000,
                          num_real: int = 0) -> float:
    """Wall time of generating `num_generated` images and extracting their features (plus `num_real`
    reference images not yet cached), each stage at its measured rate, run one after the other."""
    return num_generated / generate_ips + (num_generated + num_real) / extract_ips
