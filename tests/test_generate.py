import json
import math

import pytest
import torch
from PIL import Image

from mage_bench.config import RunConfig, resolve_config
from mage_bench.errors import UserError
from mage_bench.mage import create_model
from mage_bench.mage.generate import decoding_noise, iterative_decode
from mage_bench.samples import generate_images, to_uint8
from mage_bench.train import train


@pytest.fixture
def model(tiny_model_overrides):
    torch.manual_seed(0)
    return create_model("mage_tiny", **tiny_model_overrides).eval()


def test_images_do_not_depend_on_the_batch_size(model):
    whole = iterative_decode(model, decoding_noise(7, range(6), 4, 64), 4, 4.5)
    pieces = torch.cat([iterative_decode(model, decoding_noise(7, idx, 4, 64), 4, 4.5)
                        for idx in ([0, 1, 2, 3], [4], [5])])
    assert torch.equal(whole, pieces)
    other_seed = iterative_decode(model, decoding_noise(8, range(6), 4, 64), 4, 4.5)
    assert not torch.equal(whole, other_seed)


@pytest.mark.parametrize("steps", [1, 2, 12])
def test_every_position_is_decoded(model, steps):
    tokens = iterative_decode(model, decoding_noise(0, range(3), steps, 64), steps, 4.5)
    assert tokens.shape == (3, 64) and tokens.dtype == torch.long
    assert int(tokens.min()) >= 0 and int(tokens.max()) < model.codebook_size


def test_the_cosine_schedule_unmasks_progressively(model, monkeypatch):
    seen = []
    original = model.forward

    def spy(tokens, mask, drop):
        seen.append(int(mask[0].sum()))
        return original(tokens, mask, drop)

    monkeypatch.setattr(model, "forward", spy)
    iterative_decode(model, decoding_noise(0, range(2), 12, 64), 12, 4.5)
    # Step t sees floor(L cos(pi/2 * t/T)) unknown tokens (at least 1): the official schedule.
    expected = [64] + [max(1, math.floor(64 * math.cos(math.pi / 2 * t / 12))) for t in range(1, 12)]
    assert seen == expected


def test_generate_writes_pngs_a_grid_and_resumes(tmp_path, tiny_run_layer):
    train(resolve_config(RunConfig, tiny_run_layer), tmp_path / "run", progress=False)
    out = tmp_path / "samples"
    manifest = generate_images(tmp_path / "run", 5, out, steps=3, batch_size=2, progress=False)
    files = sorted(p.name for p in out.glob("0*.png"))
    assert files == [f"{i:06d}.png" for i in range(5)]
    assert Image.open(out / "000000.png").size == (16, 16) and (out / "grid.png").exists()
    assert json.loads((out / "generation.json").read_text())["steps"] == 3 == manifest["steps"]
    before = (out / "000003.png").read_bytes()
    (out / "000003.png").unlink()
    generate_images(tmp_path / "run", 5, out, steps=3, batch_size=5, progress=False)  # refills what is missing
    assert (out / "000003.png").read_bytes() == before
    with pytest.raises(UserError, match="made with other settings"):
        generate_images(tmp_path / "run", 5, out, steps=4, progress=False)
    with pytest.raises(UserError, match="is not a trained run"):
        generate_images(tmp_path / "nothing", 5, tmp_path / "x", progress=False)


def test_png_quantisation_truncates_as_officially_or_rounds():
    pixels = torch.tensor([0.0, 0.5, 0.999, 1.0, 1.2, -0.1])  # 0.5 * 255 = 127.5
    assert to_uint8(pixels).tolist() == [0, 127, 254, 255, 255, 0]  # (x * 255).astype(uint8)
    assert to_uint8(pixels, "round").tolist() == [0, 128, 255, 255, 255, 0]
