"""Fine-tuning (the `digits` preset) against the frozen linear probe, on a realistically pre-trained digits run.

    python tests/benchmarks/finetune_digits.py [--tokenizer-steps 200] [--steps 400] [--out DIR]

Figures, and an exit status: a vq_digits tokenizer and a mage_tiny run are trained (a few hundred steps:
below ~300 the MAGE loss has barely left the token-frequency entropy), then `eval linear` (logistic
regression on cached frozen features) and `eval finetune` run on the same test split. Prints both top-1s and
the wall time of each phase; exits 1 unless fine-tuning beats the probe by 0.05.

Measured on the 2-core machine under load from other jobs, OMP_NUM_THREADS=1: fine-tuning 0.969, linear
probe 0.836; tokenizer 31 s, pre-training 52 s, linear probe 3 s, fine-tuning 76 s (440 steps). With two
threads on that loaded machine: 0.964 vs 0.864.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=400, help="MAGE pre-training steps")
    parser.add_argument("--out", type=Path, default=None, help="where to train (default: a temporary folder)")
    args = parser.parse_args()

    from mage_bench.config import RunConfig, TokenizerJobConfig, resolve_config
    from mage_bench.eval.finetune import finetune_run
    from mage_bench.eval.runner import evaluate_run
    from mage_bench.tokenizer.train import train_tokenizer
    from mage_bench.train import train

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        times = {}
        tic = time.perf_counter()
        job = resolve_config(TokenizerJobConfig, {"tokenizer": {"name": "vq_digits"},
                                                  "train": {"steps": args.tokenizer_steps}})
        train_tokenizer(job, out / "vq", progress=False)
        times["tokenizer"], tic = time.perf_counter() - tic, time.perf_counter()
        train(resolve_config(RunConfig, {"tokenizer": str(out / "vq"), "train": {"steps": args.steps}}), out / "run",
              progress=False)
        times["pre-training"], tic = time.perf_counter() - tic, time.perf_counter()
        linear = evaluate_run(out / "run", ["linear"])["linear"][0]["value"]
        times["linear probe"], tic = time.perf_counter() - tic, time.perf_counter()
        ft_records = finetune_run(out / "run", device="cpu")
        finetuned = ft_records[0]["value"]
        times["fine-tuning"] = time.perf_counter() - tic
    print(f"digits test top-1: fine-tuning (digits preset, {ft_records[0]['steps']} steps) {finetuned:.3f}, "
          f"frozen linear probe {linear:.3f}")
    print("wall time: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in times.items()))
    return 0 if finetuned > linear + 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
