"""Tokenizers: images in [0, 1] <-> discrete codebook indices.

`create_tokenizer(name, **overrides)` builds a registered preset (see `config.TOKENIZER_PRESETS`);
`load_tokenizer(path)` reads a folder made by `mage-bench tokenizer train` or `mage-bench import`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from mage_bench.cards import CARD_FILE, card_sha256, read_card
from mage_bench.config import TokenizerConfig, from_dict, to_dict
from mage_bench.errors import CheckpointError, ConfigError

WEIGHTS_FILE = "tokenizer.pt"
FORMAT = "mage-bench/tokenizer/1"


def tokenizer_config(name: str, **overrides: Any) -> TokenizerConfig:
    return from_dict(TokenizerConfig, {"name": name, **overrides}, "tokenizer")


def create_tokenizer(name: str, **overrides: Any):
    """A freshly initialised tokenizer of preset `name` (e.g. `vqgan_mage`, `vq_digits`)."""
    from mage_bench.tokenizer.vqgan import VQGAN

    return VQGAN(tokenizer_config(name, **overrides))


def tokenizer_payload(model) -> dict[str, Any]:
    """What `tokenizer.pt` holds: plain values and tensors only, so `weights_only=True` loads it."""
    return {"format": FORMAT, "config": to_dict(model.config), "state_dict": model.state_dict()}


def tokenizer_config_at(path: str | os.PathLike) -> TokenizerConfig:
    """The architecture of the tokenizer in folder `path`, from its card when it has one (cheap)."""
    import json

    from mage_bench.io import safe_torch_load

    folder = Path(path)
    if not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"tokenizer {folder} not found (no {WEIGHTS_FILE}); train one with "
                              f"`mage-bench tokenizer train --out {folder}` or import official weights")
    card = json.loads((folder / CARD_FILE).read_text()) if (folder / CARD_FILE).is_file() else {}
    config = card.get("config") if card.get("kind") == "tokenizer" else None
    if isinstance(config, dict) and isinstance(config.get("tokenizer"), dict):
        config = config["tokenizer"]  # a trained tokenizer's card holds its whole job config
    if not isinstance(config, dict):
        config = safe_torch_load(folder / WEIGHTS_FILE)["config"]
    return from_dict(TokenizerConfig, config, "tokenizer")


def load_tokenizer(path: str | os.PathLike):
    """Load `models/NAME/` (or its `tokenizer.pt`) into a tokenizer in eval mode."""
    from mage_bench.io import check_state_dict, safe_torch_load
    from mage_bench.tokenizer.vqgan import VQGAN

    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() else path
    payload = safe_torch_load(file)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a mage-bench tokenizer; official weights go through "
                              "`mage-bench import PATH --kind vqgan --out models/NAME` first")
    try:
        cfg = from_dict(TokenizerConfig, payload["config"], "tokenizer")
    except ConfigError as exc:
        raise CheckpointError(f"{file} holds an invalid tokenizer config: {exc}") from None
    model = VQGAN(cfg)
    check_state_dict(model, payload["state_dict"], source=str(file))
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval()


def tokenizer_identity(path: str | os.PathLike) -> str:
    """What a run's `tokenizer` setting means for its numbers: the sha256 of the weights in folder `path`
    (from the folder's card, which records it, else by hashing the file). A folder that holds no
    tokenizer yet (a sweep's, before it is trained) is named by its path."""
    folder = Path(path)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        return f"path:{path}"
    return _weights_identity(str(weights.resolve()), weights.stat().st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _weights_identity(weights: str, mtime_ns: int) -> str:  # mtime in the key: a retrained file is re-read
    from mage_bench.io import sha256_file

    card = read_card(Path(weights).parent) or {}
    digest = card_sha256(card, "tokenizer") if card.get("kind") in ("tokenizer", "mage") else None
    return f"sha256:{digest or sha256_file(weights)}"
