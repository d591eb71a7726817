"""Model cards: the small `card.json` beside every stored model (tokenizers, imported MAGE checkpoints,
feature extractors), one type for all of them.

A card says what the folder holds (`kind`, `architecture`, `config`), which files (`files`: role -> file
name) with which content (`sha256`: role -> digest), where they came from (`origin`, and `source` for
imported weights) and when. Kind-specific facts (a tokenizer's test metrics, an extractor's accuracy)
go in `details` and are written at the top level of the JSON beside the common fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mage_bench.io import atomic_write_json, sha256_file, utc_now

CARD_FILE = "card.json"


@dataclass(frozen=True)
class ModelCard:
    kind: str  # tokenizer | mage | extractor
    name: str
    architecture: str
    config: dict[str, Any]
    files: dict[str, str]  # role -> file name in the folder
    sha256: dict[str, str]  # role -> sha256 of that file
    origin: str
    source: dict[str, Any] | None = None  # imported weights: path, sha256, layout, ...
    details: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=utc_now)

    def as_dict(self) -> dict[str, Any]:
        common = {"kind": self.kind, "name": self.name, "architecture": self.architecture, "origin": self.origin,
                  "source": self.source, "files": self.files, "sha256": self.sha256, "config": self.config,
                  "created_at": self.created_at}
        clash = set(self.details) & set(common)
        if clash:
            raise ValueError(f"card details {sorted(clash)} clash with the card's own fields")
        return {**common, **self.details}


def describe_files(folder: str | Path, files: dict[str, str]) -> dict[str, str]:
    """role -> sha256 of `folder/file` for every role in `files`."""
    return {role: sha256_file(Path(folder) / name) for role, name in files.items()}


def write_card(folder: str | Path, card: ModelCard) -> dict[str, Any]:
    """Write `folder/card.json` atomically (after the files it describes); returns it as a dict."""
    document = card.as_dict()
    atomic_write_json(Path(folder) / CARD_FILE, document)
    return document


def read_card(folder: str | Path) -> dict[str, Any] | None:
    """The card of `folder`, or None when it has none (or an unreadable one)."""
    path = Path(folder) / CARD_FILE
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return card if isinstance(card, dict) else None


def card_sha256(card: dict[str, Any], role: str) -> str | None:
    """The digest of the file with `role`; cards written before `files` existed held one string."""
    digests = card.get("sha256")
    if isinstance(digests, dict):
        return digests.get(role)
    return digests if isinstance(digests, str) else None
