"""Importing official MAGE checkpoints (`{'model': state_dict}`, maybe with an argparse `args`).

Our MAGE keeps the official module names (legacy unused parameters included), so nothing is
renamed. The official file holds the VQGAN under `vqgan.*`: those keys become the tokenizer
(`tokenizer.pt`), every other key the model. The size (ViT-B or ViT-L) is the official preset whose
keys and shapes match exactly; anything else is reported key by key.

The result is a folder that `mage-bench generate --run models/NAME` and the evaluators read like a
trained run: `checkpoint.pt` (config + model), `tokenizer.pt`, `card.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mage_bench.errors import CheckpointError

OFFICIAL_PRESETS = ("mage_vit_base_patch16", "mage_vit_large_patch16")


def import_official_mage(path: str, out_dir: str) -> dict[str, Any]:
    import torch

    from mage_bench.cards import ModelCard, describe_files, write_card
    from mage_bench.config import DataConfig, RunConfig, from_dict, to_dict
    from mage_bench.io import atomic_torch_save, check_state_dict, safe_torch_load, sha256_file
    from mage_bench.mage import create_model
    from mage_bench.runs import CHECKPOINT_FILE
    from mage_bench.tokenizer import WEIGHTS_FILE, create_tokenizer, tokenizer_payload
    from mage_bench.tokenizer.checkpoint import unwrap_vqgan_state_dict

    payload = safe_torch_load(path)
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise CheckpointError(f"{path} is not an official MAGE checkpoint (expected a dict with a 'model' entry)")
    weights = {k: v for k, v in payload["model"].items() if not k.startswith("vqgan.")}
    width = tuple(getattr(weights.get("token_emb.word_embeddings.weight"), "shape", (0, 0)))[1]
    name = {768: "mage_vit_base_patch16", 1024: "mage_vit_large_patch16"}.get(width, OFFICIAL_PRESETS[0])
    with torch.device("meta"):
        reference = create_model(name)
    check_state_dict(reference, weights, path)  # lists every missing, unexpected and mis-shaped key
    model = create_model(name)
    model.load_state_dict(weights, strict=True)
    out = Path(out_dir)
    vqgan_state, _ = unwrap_vqgan_state_dict(payload, path)
    tokenizer = create_tokenizer("vqgan_mage")
    check_state_dict(tokenizer, vqgan_state, f"{path} (vqgan.*)")
    tokenizer.load_state_dict(vqgan_state, strict=True)
    config = from_dict(RunConfig, {"model": {"name": name}, "tokenizer": str(out),
                                   "data": to_dict(DataConfig(name="imagefolder:imagenet", image_size=256))})
    atomic_torch_save(tokenizer_payload(tokenizer), out / WEIGHTS_FILE)
    atomic_torch_save({"config": to_dict(config), "model": model.state_dict(), "head": None, "step": 0,
                       "imported_from": str(Path(path).resolve())}, out / CHECKPOINT_FILE)
    args = payload.get("args")
    files = {"checkpoint": CHECKPOINT_FILE, "tokenizer": WEIGHTS_FILE}
    return write_card(out, ModelCard(
        kind="mage", name=out.name, architecture=name, config=to_dict(config), files=files,
        sha256=describe_files(out, files), origin="official MAGE checkpoint (imported, strict)",
        source={"path": str(Path(path).resolve()), "sha256": sha256_file(path),
                "args": vars(args) if args is not None and hasattr(args, "__dict__") else None}))
