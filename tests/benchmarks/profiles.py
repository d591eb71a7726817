"""Time per stage of a digits run's generation evaluation under evaluation profiles (no assertions).

    python tests/benchmarks/profiles.py [--steps 30] [--keep DIR]

Trains a small digits run (a 100-step vq_digits tokenizer, mage_tiny), then evaluates it under three profiles in one cache: `digits` (cold: both feature
passes run), a user profile sharing its extractor (`base: digits`, precision/recall only: must read both
feature sets back) and one sharing nothing (torch-fidelity's Inception with random weights on the same images:
extracts again). Prints, per profile, the stages the records time (generation, each side's feature pass or
cache read, metric arithmetic with the bootstrap) and the ratio the issue bounds: (total - generation) /
(the cold feature passes + the metric arithmetic). Then the generated side's cost per 1,000 images with PNG
files (generate, write, read back) and streamed from the decoder to the extractor.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--keep", help="work folder to keep (default: a temporary one)")
    args = parser.parse_args()

    from mage_bench.config import RunConfig, resolve_config
    from mage_bench.eval.extractors import write_random_inception_weights
    from mage_bench.eval.profile_eval import evaluate_profile
    from mage_bench.runs import load_run
    from mage_bench.train import train

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="profiles-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    run_dir, cache = root / "run", root / "cache"
    if not (run_dir / "checkpoint.pt").is_file():
        from mage_bench.config import TokenizerJobConfig
        from mage_bench.tokenizer.train import train_tokenizer

        tokenizer = root / "vq-digits"
        train_tokenizer(resolve_config(TokenizerJobConfig, {"train": {"steps": 100}}), tokenizer, progress=False)
        layer = {"tokenizer": str(tokenizer), "train": {"steps": args.steps, "proxy_every": 0}}
        train(resolve_config(RunConfig, layer), run_dir, progress=False)
    shared = root / "digits-prdc.yaml"
    shared.write_text(yaml.safe_dump({"base": "digits", "metrics": ["precision", "recall"]}))
    nothing = root / "inception-digits.yaml"
    nothing.write_text(yaml.safe_dump({"base": "mage-paper", "weights_sha256": "", "num_samples": None,
                                       "num_real": None, "image_size": None, "reference": "dataset",
                                       "reference_data": "digits", "decode_steps": None, "decode_temperature": None,
                                       "metrics": ["fid", "is"]}))
    inception = write_random_inception_weights(root / "inception-random.pth")
    run = load_run(run_dir, "cpu")
    print(f"run: {run_dir} ({args.steps} steps of mage_tiny on digits); cache: {cache}")
    print(f"{'profile':<18}{'generate':>10}{'fake feat':>12}{'real feat':>12}{'metrics':>10}{'total':>9}  notes")
    cold = {}
    for profile, weights in (("digits", None), (str(shared), None), (str(nothing), str(inception))):
        start = time.perf_counter()
        records = evaluate_profile(run, "digits", profile, weights=weights, device="cpu", cache_dir=cache)
        wall = time.perf_counter() - start
        r = records[0]
        notes = ", ".join(f"{side} features {'cached' if r[f'{side}_features_cached'] else 'extracted'}"
                          for side in ("fake", "real"))
        print(f"{r['profile']:<18}{r['generate_s']:>10.2f}{r['fake_features_s']:>12.2f}{r['real_features_s']:>12.2f}"
              f"{r['metrics_s']:>10.2f}{wall:>9.2f}  {notes}")
        if not (r["fake_features_cached"] or r["real_features_cached"]):
            cold[r["profile"]] = (wall - r["generate_s"]) / (r["fake_features_s"] + r["real_features_s"]
                                                              + r["metrics_s"])
    for name, ratio in cold.items():
        print(f"{name}: (total - generation) / (feature passes + metric arithmetic) = {ratio:.2f}x")

    # PNG round trip against streaming, 1,000 fresh images each (decoding settings no earlier call used)
    fresh = root / "round-trip.yaml"
    for label, temperature, stream in (("PNG files", 2.0, False), ("streamed", 2.5, True)):
        fresh.write_text(yaml.safe_dump({"base": "digits", "num_samples": 1000, "decode_temperature": temperature,
                                         "metrics": ["fid"], "bootstrap": 0}))
        start = time.perf_counter()
        r = evaluate_profile(run, "digits", str(fresh), device="cpu", cache_dir=cache, stream=stream)[0]
        wall = time.perf_counter() - start
        generate = r.get("generate_s", 0.0)
        print(f"{label:>9}: generate {generate:6.2f} s + fake features {r['fake_features_s']:6.2f} s "
              f"= {generate + r['fake_features_s']:6.2f} s per 1,000 images (call {wall:.2f} s)")


if __name__ == "__main__":
    main()
