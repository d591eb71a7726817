"""A big preset's whole path at toy scale: `python tests/preset_smoke.py paper|cifar10 [--out DIR] [--points N]`.

`paper`: the preset of experiments/masking.yaml as a user would run it (folder data at 256 px, the official-size
VQGAN and ViT-B, Inception FID, the report), with only what cannot exist here replaced: a small random image
folder in ImageNet's imagefolder layout, the VQGAN and Inception with random weights the script makes, the
local executor on CPU instead of Slurm on GPUs, and toy sizes (2 training steps of batch 2, 10 generated
images decoded in 2 steps, a few shots). Everything else (model, tokenizer config, masking, FID settings,
record schema, report) is the preset's. tests/test_presets_smoke.py runs it; errors on this path surface
here, not on a cluster.

`cifar10`: that preset's path (the sweep training its own 32 px vq_digits tokenizer, mage_small on 8x8 tokens,
Inception FID, the report), with a 32 px random image folder standing in for CIFAR-10: torchvision's CIFAR-10
reader checks the md5 of the official batch files, which made-up data cannot match, so the `cifar10:` reader
itself is not run here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# What the toy run changes in the preset (everything else is the preset's own).
TOY = {
    "run": {"data": {"num_workers": 0},
            "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "device": "cpu", "checkpoint_every": 2,
                      "proxy_every": 0},
            "generate": {"steps": 2}},
    "eval": {"num_samples": 10, "device": "cpu", "batch_size": 4, "fewshot_shots": [1, 2], "fewshot_draws": 2,
             "knn_ks": [1, 2]},
    "executor": {"name": "local"},
}


def toy_spec(root: Path, preset: str = "paper", points: int = 1) -> Path:
    """Write the toy data, random-weight VQGAN and Inception under `root`, and the preset's spec with TOY
    overlaid; returns the spec's path."""
    import torch
    import yaml

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_image_folder

    from mage_bench.config import deep_merge, load_yaml
    from mage_bench.eval.extractors import write_random_inception_weights
    from mage_bench.tokenizer import create_tokenizer, tokenizer_payload

    raw = load_yaml(ROOT / "experiments" / "masking.yaml")
    presets = raw.pop("presets")
    raw.pop("default_preset", None)
    spec: dict[str, Any] = deep_merge(raw, presets[preset])
    inception = write_random_inception_weights(root / "inception-random.pth")
    spec = deep_merge(spec, TOY)
    spec = deep_merge(spec, {"name": f"smoke-{preset}", "points": spec["points"][:points],
                             "eval": {"weights": str(inception)}})
    if preset == "paper":
        data = write_image_folder(root / "imagenet", {"train": 4, "val": 2}, shape=(300, 280, 3))
        tokenizer = root / "vqgan"
        tokenizer.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(tokenizer_payload(create_tokenizer("vqgan_mage")), tokenizer / "tokenizer.pt")
        spec = deep_merge(spec, {"run": {"data": {"name": f"imagefolder:{data}"}},
                                 "tokenizer": {"path": str(tokenizer)}})
    else:  # cifar10: the sweep trains the preset's tokenizer, on the stand-in folder
        data = write_image_folder(root / "cifar10", {"train": 8, "val": 8}, shape=(32, 32, 3))
        spec = deep_merge(spec, {"run": {"data": {"name": f"imagefolder:{data}"}},
                                 "tokenizer": {"train": {"data": {"name": f"imagefolder:{data}"},
                                                         "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1,
                                                                   "eval_images": 8}}}})
    path = root / f"smoke-{preset}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from mage_bench.cli import main as cli

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=["paper", "cifar10"])
    parser.add_argument("--out", type=Path, help="where to write (default: a temporary folder)")
    parser.add_argument("--points", type=int, default=1)
    args = parser.parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="preset-smoke-"))
    path = toy_spec(root, args.preset, args.points)
    return cli(["sweep", str(path), "--runs", str(root / "runs"), "--out", str(root / "report")])


if __name__ == "__main__":
    sys.exit(main())
