"""Shared fixtures: tiny configurations so the whole suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skipped (and so counted) where torch sees none."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (scripts/device-check runs these on a GPU)")
        for item in gpu:
            item.add_marker(skip)

# A tokenizer small enough to train a few steps in well under a second per step.
# The tests keep the 8x8 grid: 64 tokens exercise masking and decoding with more room.
TINY_TOKENIZER = {"ch": 8, "ch_mult": [1, 2], "norm_groups": 4, "z_channels": 16, "embed_dim": 8, "n_embed": 32}


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


# A MAGE small enough for a training step in a few milliseconds, on the tiny tokenizer's 8x8 grid.
TINY_MODEL = {"num_tokens": 64, "embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1,
              "decoder_num_heads": 2, "codebook_size": 32, "dropout": 0.0}


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A tiny digits tokenizer trained for a few steps (real weights, made by the tests)."""
    from mage_bench.config import TokenizerJobConfig, resolve_config
    from mage_bench.tokenizer.train import train_tokenizer

    out = tmp_path_factory.mktemp("models") / "vq-tiny"
    layer = {"tokenizer": dict(TINY_TOKENIZER),
             "train": {"steps": 6, "batch_size": 32, "warmup_steps": 2, "eval_images": 32}}
    train_tokenizer(resolve_config(TokenizerJobConfig, layer), out, progress=False)
    return out


@pytest.fixture
def tiny_run_layer(tiny_tokenizer_dir) -> dict:
    """A config layer for `train` that runs a step in milliseconds."""
    return {
        "tokenizer": str(tiny_tokenizer_dir),
        "model": dict(TINY_MODEL),
        # No training-time proxies (they would run at every test run's last step): tests/test_proxies.py
        # turns them on where they are the subject.
        "train": {"steps": 6, "batch_size": 16, "blr": 0.01, "warmup_steps": 2, "checkpoint_every": 3,
                  "log_every": 1, "proxy_every": 0},
    }


@pytest.fixture
def tiny_model_overrides() -> dict:
    return dict(TINY_MODEL)


@pytest.fixture(scope="session")
def digits_cnn(tmp_path_factory):
    """The digits-cnn feature extractor, trained once per test session: (weights file, card)."""
    from mage_bench.eval.extractors import DIGITS_CNN_FILE, train_digits_cnn

    out = tmp_path_factory.mktemp("models") / "digits-cnn"
    card = train_digits_cnn(out, seed=0)
    return out / DIGITS_CNN_FILE, card


def write_image_folder(root, counts: dict[str, int], shape=(16, 16, 3), classes=("a", "b"), seed: int = 0):
    """An imagefolder data set of random RGB PNGs: root/<split>/<class>/<i>.png, counts[split] per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def chromium_figures(index, profile) -> tuple[int, int, list[str]] | None:
    """Open a report's index.html in headless Chromium: (figures decoded, figures on the page, console
    errors), read from the `data-figures` mark the page sets on body once loaded. None without Chromium
    (Debian: apt install chromium); an assertion error when the page never set the mark."""
    import re
    import subprocess
    from pathlib import Path

    binary = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
                   if Path(p).is_file()), None)
    if binary is None:
        return None
    result = subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=10000", "--dump-dom", Path(index).as_uri()],
        capture_output=True, text=True, timeout=180)
    marker = re.search(r'data-figures="(\d+)/(\d+)"', result.stdout)
    assert marker, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    return int(marker.group(1)), int(marker.group(2)), console
