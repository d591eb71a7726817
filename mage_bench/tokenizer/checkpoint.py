"""Importing official VQGAN weights (`vqgan_jax_strongaug.ckpt`) strictly and safely.

Our module tree mirrors the official one, so no parameter is renamed; only the container differs.
The whole remapping is this table (`LAYOUTS`):

| source file                                   | detected by                          | keys taken                 |
|-----------------------------------------------|--------------------------------------|----------------------------|
| taming / official VQGAN `{"state_dict": sd}`  | a top-level "state_dict" mapping     | all, unchanged             |
| full MAGE checkpoint `{"model": sd, ...}`     | a top-level "model" with `vqgan.*`   | `vqgan.<k>` -> `<k>`       |
| bare state_dict                               | tensor values at the top level       | all, unchanged             |

After unwrapping, the key set and every shape must equal the `vqgan_mage` architecture exactly:
missing, unexpected and mis-shaped keys are all reported, never skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mage_bench.errors import CheckpointError

MAGE_VQGAN_PREFIX = "vqgan."


def _is_state_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_vqgan_state_dict(payload: Any, source: str) -> tuple[dict[str, Any], str]:
    """The VQGAN state_dict inside an official file, and which row of `LAYOUTS` matched."""
    if isinstance(payload, Mapping) and _is_state_dict(payload.get("state_dict")):
        return dict(payload["state_dict"]), "state_dict"
    if isinstance(payload, Mapping) and isinstance(payload.get("model"), Mapping):
        inner = payload["model"]
        taken = {k[len(MAGE_VQGAN_PREFIX):]: v for k, v in inner.items() if k.startswith(MAGE_VQGAN_PREFIX)}
        if taken:
            return taken, "mage-model"
    if _is_state_dict(payload):
        return dict(payload), "bare"
    keys = list(payload)[:5] if isinstance(payload, Mapping) else type(payload).__name__
    raise CheckpointError(f"{source} holds no VQGAN weights (top level: {keys}); expected "
                          "{'state_dict': ...}, a MAGE {'model': {'vqgan.*': ...}} or a bare state_dict")


def import_official_vqgan(path: str, out_dir: str, name: str = "vqgan_mage") -> dict[str, Any]:
    """Load official VQGAN weights strictly into `vqgan_mage` and write `out_dir/tokenizer.pt` + card."""
    import torch

    from mage_bench.cards import ModelCard, describe_files, write_card
    from mage_bench.config import to_dict
    from mage_bench.io import atomic_torch_save, check_state_dict, safe_torch_load, sha256_file
    from mage_bench.tokenizer import WEIGHTS_FILE, create_tokenizer, tokenizer_payload

    payload = safe_torch_load(path)
    state_dict, layout = unwrap_vqgan_state_dict(payload, path)
    model = create_tokenizer(name)
    check_state_dict(model, state_dict, path)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state_dict.items()}, strict=True)
    out = Path(out_dir)
    atomic_torch_save(tokenizer_payload(model), out / WEIGHTS_FILE)
    return write_card(out, ModelCard(
        kind="tokenizer", name=out.name, architecture=name, config=to_dict(model.config),
        files={"tokenizer": WEIGHTS_FILE}, sha256=describe_files(out, {"tokenizer": WEIGHTS_FILE}),
        origin="official MAGE VQGAN weights (imported, strict)",
        source={"path": str(Path(path).resolve()), "sha256": sha256_file(path), "layout": layout}))
