"""Per-step time and host-sync count of a real training step, and the cost of drawing a step's masks.

    python tests/benchmarks/train_step.py [--steps 30] [--device cpu|cuda]

Figures, not assertions. Three things are printed:
- the tiny sweep preset's training step (digits 16 px, mage_tiny, batch 128; MAGE and MAGE-C) through
  `Trainer` + `WindowedSteps`, i.e. everything a step does: the batch, the masks, forward, backward,
  AdamW, the logged losses;
- the host syncs per step: reads of a tensor's value on the host (`aten._local_scalar_dense`: `float()`,
  `bool()`, `.item()`), outputs whose shape depends on values (`nonzero`, boolean indexing,
  `masked_select`) and `.tolist()`, counted on any device (on a GPU each one waits for the device);
- drawing one step's masks at the paper's scale (4,096 images x 256 tokens) for one process of a
  `world`-process job: what every rank pays per step before it can start its forward.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique")


class HostSyncCounter(TorchDispatchMode):
    """Counts the operations that make the host wait for a tensor's value (see the module docstring).

    `count` leaves out the optimizer's reads of its step counters (`optimizer_reads`): AdamW keeps them
    on the CPU unless fused or capturable, so they never wait for a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = self.optimizer_reads = 0
        self._tolist = torch.Tensor.tolist

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import traceback

        name = str(func)
        bool_index = name.startswith("aten.index.Tensor") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if name.startswith(SYNC_OPS) or bool_index:
            if any("torch/optim/" in frame.filename for frame in traceback.extract_stack()):
                self.optimizer_reads += 1
            else:
                self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        counter = self

        def counted_tolist(tensor):
            counter.count += 1
            return counter._tolist(tensor)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def tiny_tokenizer(folder: Path) -> Path:
    from mage_bench.config import TokenizerJobConfig, resolve_config
    from mage_bench.tokenizer.train import train_tokenizer

    layer = {"data": {"name": "digits", "image_size": 16}, "tokenizer": {"name": "vq_digits", "resolution": 16},
             "train": {"steps": 10, "batch_size": 64, "warmup_steps": 2, "eval_images": 64}}
    out = folder / "vq"
    train_tokenizer(resolve_config(TokenizerJobConfig, layer), out, progress=False)
    return out


def bench_steps(tokenizer: Path, contrastive: float, steps: int, device: str) -> tuple[float, int, int]:
    """(seconds per step, host syncs per step, the optimizer's CPU step-counter reads) of the tiny
    preset's training step."""
    from mage_bench.config import RunConfig, resolve_config
    from mage_bench.train import Trainer, WindowedSteps, resolve_run_config, setup_runtime

    layer = {"data": {"name": "digits", "image_size": 16}, "tokenizer": str(tokenizer),
             "model": {"name": "mage_tiny"}, "masking": {"mask_ratio_min": 0.5},
             "contrastive": {"weight": contrastive}, "train": {"steps": 10_000, "batch_size": 128, "device": device}}
    config = resolve_run_config(resolve_config(RunConfig, layer))
    trainer = Trainer(config, setup_runtime(config))
    loop = WindowedSteps(trainer)
    for step in range(3):  # warm-up
        loop.train_step(step)
    with HostSyncCounter() as counter:
        loop.train_step(3)
    syncs, optimizer_reads = counter.count, counter.optimizer_reads
    if trainer.runtime.device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    for step in range(4, 4 + steps):
        loop.train_step(step)
    if trainer.runtime.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - tic) / steps, syncs, optimizer_reads


def bench_masks(world: int, global_batch: int = 4096, tokens: int = 256, repeats: int = 10,
                device: str = "cpu") -> float:
    """Seconds to draw one step's ratios and masks for rank 0 of `world` processes (official masking)."""
    from mage_bench.mage import masking as m

    distribution = m.create_masking("truncnorm:mean=0.55,std=0.25,min=0.5,max=1.0")
    batch = global_batch // world
    generator = torch.Generator().manual_seed(0)
    dev = torch.device(device)
    new_api = hasattr(m, "rank_token_masks")
    tic = time.perf_counter()
    for step in range(repeats):
        ratios = m.batch_ratios(distribution, batch, "process", world, generator)
        if new_api:
            mask, drop = m.rank_token_masks(ratios[:batch].to(dev), tokens, 0.5, seed=0, step=step, view=0,
                                            first_row=0)
        else:  # before: the whole global batch on the CPU, then this rank's rows
            mask, drop = m.sample_token_masks(ratios, tokens, 0.5, generator)
            mask, drop = mask[:batch].to(dev), drop[:batch].to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - tic) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_tokenizer(Path(tmp))
        for name, weight in (("MAGE", 0.0), ("MAGE-C", 0.1)):
            step_s, syncs, optimizer_reads = bench_steps(tokenizer, weight, args.steps, args.device)
            print(f"train step, tiny preset, {name:<6} on {args.device}: {1000 * step_s:7.1f} ms/step, "
                  f"{syncs} host syncs/step (+ {optimizer_reads} reads of AdamW's CPU step counters)")
    for world in (1, 8, 64):
        print(f"masks of one step, 4096 x 256 tokens, rank 0 of {world:>2} on {args.device}: "
              f"{1000 * bench_masks(world, device=args.device):7.2f} ms")


if __name__ == "__main__":
    main()
