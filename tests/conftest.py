"""Shared fixtures: tiny configurations so the whole suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import pytest

# A tokenizer small enough to train a few steps in well under a second per step.
TINY_TOKENIZER = {"ch": 8, "norm_groups": 4, "z_channels": 16, "embed_dim": 8, "n_embed": 32}


@pytest.fixture
def tiny_tokenizer_overrides() -> dict:
    return dict(TINY_TOKENIZER)


@pytest.fixture
def tiny_job_layer() -> dict:
    """A config-file layer for `tokenizer train` that finishes in a few seconds."""
    return {
        "tokenizer": dict(TINY_TOKENIZER),
        "train": {"steps": 12, "batch_size": 16, "warmup_steps": 2, "checkpoint_every": 4, "log_every": 2,
                  "dead_code_every": 5, "eval_images": 64},
    }
