"""Masked reconstruction: decoding from a partly known token grid, mask families, `inpaint` and `eval inpaint`."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mage_bench.cli import main
from mage_bench.config import EvalConfig, RunConfig, from_dict, resolve_config
from mage_bench.errors import ConfigError, UserError
from mage_bench.mage import create_model
from mage_bench.mage.generate import complete_tokens, decoding_noise, schedule_lengths
from mage_bench.mage.inpaint_masks import masks_for, overlapping_tokens, parse_mask, parse_masks


@pytest.fixture
def model(tiny_model_overrides):
    torch.manual_seed(0)
    return create_model("mage_tiny", **tiny_model_overrides).eval()


def _spy_masks(model, monkeypatch) -> list[torch.Tensor]:
    seen = []
    original = model.forward

    def spy(tokens, mask, drop):
        seen.append(mask.clone())
        return original(tokens, mask, drop)

    monkeypatch.setattr(model, "forward", spy)
    return seen


# --------------------------------------------------------------------------------------------
# Decoding from a partly known grid


def test_known_tokens_are_never_masked_nor_changed(model, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 32, (4, 64), generator=gen)
    unknown = torch.rand(4, 64, generator=gen) < torch.tensor([[0.1], [0.5], [0.9], [1.0]])
    seen = _spy_masks(model, monkeypatch)
    for argmax in (False, True):
        seen.clear()
        out = complete_tokens(model, tokens, unknown, decoding_noise(3, range(4), 8, 64), 8, 4.5, argmax=argmax)
        assert torch.equal(out[~unknown], tokens[~unknown])
        assert all(not (mask & ~unknown).any() for mask in seen)  # the model never sees a known token masked
        assert seen[0].equal(unknown)


def test_a_mask_with_nothing_unknown_returns_the_input_tokens(model):
    tokens = torch.randint(0, 32, (3, 64), generator=torch.Generator().manual_seed(2))
    out = complete_tokens(model, tokens, torch.zeros(3, 64, dtype=torch.bool), decoding_noise(0, range(3), 6, 64),
                          6, 4.5)
    assert torch.equal(out, tokens)


def test_unknown_tokens_follow_the_cosine_schedule_over_their_own_count(model, monkeypatch):
    unknown = torch.zeros(2, 64, dtype=torch.bool)
    unknown[0, :16] = True  # 16 unknown
    unknown[1, 10:15] = True  # 5 unknown
    seen = _spy_masks(model, monkeypatch)
    complete_tokens(model, torch.zeros(2, 64, dtype=torch.long), unknown, decoding_noise(0, range(2), 12, 64), 12, 4.5)
    counts = [mask.sum(dim=1).tolist() for mask in seen]
    expected, now = [[16, 5]], [16, 5]
    for step in range(11):
        now = schedule_lengths([16, 5], now, step, 12)
        expected.append(now)
    assert counts == expected
    # floor(U0 cos(pi/2 t/T)), at least 1 and below the count of the step before (the official clamps)
    assert counts[1][0] == min(15, math.floor(16 * math.cos(math.pi / 2 / 12)))
    assert all(a > b or b == 1 for (a, _), (b, _) in zip(counts, counts[1:], strict=False))


def test_full_masks_decode_as_generation_does(model):
    from mage_bench.mage.generate import iterative_decode

    noise = decoding_noise(5, range(3), 5, 64)
    whole = complete_tokens(model, torch.zeros(3, 64, dtype=torch.long), torch.ones(3, 64, dtype=torch.bool), noise,
                            5, 4.5)
    assert torch.equal(whole, iterative_decode(model, noise, 5, 4.5))


# --------------------------------------------------------------------------------------------
# Mask families


def _one_pixel_mask(tmp_path, y: int, x: int, size: int = 16):
    pixels = np.zeros((size, size), dtype=np.uint8)
    pixels[y, x] = 255
    path = tmp_path / f"mask-{y}-{x}.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("y,x", [(0, 0), (3, 4), (7, 7), (8, 15), (15, 0)])
def test_the_overlap_rule_maps_one_pixel_to_exactly_its_token(tmp_path, y, x):
    mask = parse_mask(f"pixels:{_one_pixel_mask(tmp_path, y, x)}")
    tokens, pixels = masks_for(mask, [0, 1], seed=0, grid=4, height=16, width=16)
    expected = np.zeros((4, 4), dtype=bool)
    expected[y // 4, x // 4] = True
    assert (tokens == expected).all() and pixels.sum() == 2  # the same mask for every image
    grown, _ = masks_for(mask, [0], seed=0, grid=4, height=16, width=16, dilate=1)
    ring = np.zeros((6, 6), dtype=bool)
    ring[y // 4:y // 4 + 3, x // 4:x // 4 + 3] = True
    assert (grown[0] == ring[1:5, 1:5]).all()  # one ring of neighbours, clipped at the border


def test_geometric_masks_in_tokens():
    box, _ = masks_for(parse_mask("box:center"), [0], 0, 4, 16, 16)
    assert box[0].astype(int).tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    border, pixels = masks_for(parse_mask("border:4"), [0], 0, 4, 16, 16)
    assert (border[0] == ~box[0]).all() and pixels[0].sum() == 16 * 16 - 8 * 8
    thin, _ = masks_for(parse_mask("border:1"), [0], 0, 4, 16, 16)
    assert (thin[0] == ~box[0]).all()  # any overlap makes the token unknown
    left, _ = masks_for(parse_mask("box:half-left"), [0], 0, 8, 16, 16)
    assert left[0][:, :4].all() and not left[0][:, 4:].any()
    assert overlapping_tokens(np.zeros((16, 16), dtype=bool), 4).sum() == 0


def test_random_masks_are_seeded_per_image_with_the_official_count():
    mask = parse_mask("random:0.3")
    tokens, pixels = masks_for(mask, [0, 1, 2], seed=7, grid=8, height=16, width=16)
    assert tokens.reshape(3, -1).sum(axis=1).tolist() == [math.ceil(0.3 * 64)] * 3
    assert (pixels == tokens.repeat(2, axis=1).repeat(2, axis=2)).all()  # each token's 2x2 patch
    alone, _ = masks_for(mask, [2], seed=7, grid=8, height=16, width=16)
    assert (alone[0] == tokens[2]).all()  # image 2's mask does not depend on its batch
    assert not (tokens[0] == tokens[1]).all()
    other, _ = masks_for(mask, [0], seed=8, grid=8, height=16, width=16)
    assert not (other[0] == tokens[0]).all()
    assert parse_mask("random:0").tokens(4, 0, 0).sum() == 0 and parse_mask("random:1").tokens(4, 0, 0).all()


@pytest.mark.parametrize("spec,message", [
    ("rnd:0.5", "unknown mask family 'rnd' (did you mean 'random'?)"),
    ("random:abc", "the ratio must be a number"),
    ("random:1.5", "the ratio must be in [0, 1]"),
    ("box:middle", "unknown box; use one of box:center"),
    ("border:0", "whole number of pixels >= 1"),
    ("border:-2", "whole number of pixels >= 1"),
    ("pixels:/nonexistent/mask.png", "no such mask image"),
])
def test_bad_mask_specs_are_one_line_errors(spec, message):
    with pytest.raises(UserError) as caught:
        parse_mask(spec)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_masks_that_do_not_fit_the_images_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=r"is 16x16 but the images are 32x32; resize the mask image"):
        masks_for(parse_mask(f"pixels:{_one_pixel_mask(tmp_path, 1, 1)}"), [0], 0, 4, 32, 32)
    with pytest.raises(UserError, match="leaves nothing known"):
        masks_for(parse_mask("border:8"), [0], 0, 4, 16, 16)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="not a readable image"):
        masks_for(parse_mask(f"pixels:{tmp_path / 'broken.png'}"), [0], 0, 4, 16, 16)
    assert [m.spec for m in parse_masks("random:0.50,random:.5, box:center")] == ["random:0.5", "box:center"]
    with pytest.raises(ConfigError, match=r"eval.inpaint: mask random:2: the ratio must be in \[0, 1\]"):
        from_dict(EvalConfig, {"inpaint": ["random:2"]}, "eval")


# --------------------------------------------------------------------------------------------
# On a trained (tiny) run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_tokenizer_dir):
    from conftest import TINY_MODEL

    from mage_bench.train import train

    layer = {"tokenizer": str(tiny_tokenizer_dir), "model": dict(TINY_MODEL),
             "train": {"steps": 6, "batch_size": 16, "blr": 0.01, "proxy_every": 0, "warmup_steps": 2, "checkpoint_every": 6,
                       "log_every": 3}}
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    train(resolve_config(RunConfig, layer), run_dir, progress=False)
    return run_dir


@pytest.mark.parametrize("spec", ["random:0.5", "box:center"])
def test_the_same_images_whatever_the_batch_size(tiny_run, spec):
    from mage_bench.inpainting import complete_batch, decoding_of, source_images
    from mage_bench.runs import load_run

    run = load_run(tiny_run)
    dataset, _ = source_images(run, "digits")
    images = torch.stack([dataset[i][0] for i in range(6)])
    mask, decoding = parse_mask(spec), decoding_of(run, steps=4, seed=3)
    whole = complete_batch(run, images, list(range(6)), mask, decoding)
    pieces = [complete_batch(run, images[lo:hi], list(range(lo, hi)), mask, decoding)
              for lo, hi in ((0, 4), (4, 5), (5, 6))]
    assert torch.equal(whole.result_tokens, torch.cat([p.result_tokens for p in pieces]))
    # The tokens are the same bits; the VQGAN's convolutions may round differently per batch shape (last bit).
    torch.testing.assert_close(whole.result, torch.cat([p.result for p in pieces]), rtol=0, atol=1e-5)
    known = ~whole.unknown_tokens
    if spec.startswith("random"):  # token masks keep the intact image's own tokens
        assert torch.equal(whole.result_tokens[known], whole.original_tokens[known])
    pasted = complete_batch(run, images, list(range(6)), mask, decoding_of(run, steps=4, seed=3, paste_back=True))
    outside = ~whole.unknown_pixels[:, None].expand_as(images)
    assert torch.equal(pasted.result[outside], images[outside])
    assert torch.equal(pasted.result[~outside], whole.result[~outside])


def test_the_psnr_is_taken_over_the_unknown_pixels_only():
    from mage_bench.eval.inpaint import psnr

    reference = torch.zeros(2, 3, 4, 4)
    images = reference.clone()
    images[0, :, :2] = 0.1  # error only in the top half
    unknown = torch.zeros(2, 4, 4, dtype=torch.bool)
    unknown[:, :2] = True
    values = psnr(images, reference, unknown)
    assert values[0].item() == pytest.approx(20.0, abs=1e-4)  # mse 0.01 on the unknown pixels
    assert values[1].item() == pytest.approx(100.0)  # a perfect completion: the MIN_MSE cap
    unknown[0] = True
    assert psnr(images, reference, unknown)[0].item() == pytest.approx(10 * math.log10(1 / 0.005), abs=1e-4)


def test_inpaint_command_writes_triplets_a_grid_and_its_settings(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["inpaint", "--run", str(tiny_run), "--images", "digits", "--mask", "box:center", "--out", str(out),
            "--num", "5", "--steps", "3", "--quiet"]
    assert main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{i:06d}-{k}.png" for i in range(5) for k in ("original", "masked", "result")]
                           + ["grid.png", "inpaint.json"])
    manifest = json.loads((out / "inpaint.json").read_text())
    assert manifest["mask"] == "box:center" and manifest["steps"] == 3 and manifest["count"] == 5
    masked = np.asarray(Image.open(out / "000000-masked.png"))
    assert (masked[4:12, 4:12] == 127).all()  # the unknown box shown grey (0.5, truncated)
    before = (out / "000003-result.png").read_bytes()
    assert main(argv) == 0  # the same settings again: the same files
    assert (out / "000003-result.png").read_bytes() == before
    capsys.readouterr()
    assert main(argv[:-3] + ["--steps", "4", "--quiet"]) == 2  # other settings into the same folder
    assert "choose an empty --out" in capsys.readouterr().err
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 24, 3), 40 * i, dtype=np.uint8)).save(folder / f"p{i}.png")
    assert main(["inpaint", "--run", str(tiny_run), "--images", str(folder), "--mask", "random:0.5", "--out",
                 str(tmp_path / "photos-out"), "--argmax", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 3
    assert Image.open(tmp_path / "photos-out" / "000002-result.png").size == (16, 16)  # the run's view


@pytest.mark.parametrize("argv,message", [
    (["--mask", "blob:1"], "unknown mask family 'blob'"),
    (["--mask", "border:8"], "leaves nothing known"),
    (["--images", "/nonexistent/folder"], "neither a folder nor a data set"),
    (["--num", "0"], "--num must be >= 1"),
])
def test_inpaint_command_bad_input_exits_2_and_writes_nothing(tiny_run, tmp_path, capsys, argv, message):
    base = {"--run": str(tiny_run), "--images": "digits", "--mask": "box:center", "--out": str(tmp_path / "out")}
    base.update(dict(zip(argv[::2], argv[1::2], strict=True)))
    assert main(["inpaint", *[x for kv in base.items() for x in kv], "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_eval_inpaint_records_resume_and_the_sweep_path(tiny_run, tmp_path, digits_cnn, capsys, monkeypatch):
    from mage_bench import inpainting
    from mage_bench.eval.inpaint import evaluate_inpainting
    from mage_bench.eval.runner import evaluate_all

    cache = tmp_path / "cache"
    argv = ["eval", "inpaint", "--run", str(tiny_run), "--masks", "random:0.25,random:0.75,box:center",
            "--inpaint-images", "40", "--steps", "3", "--extractor", "digits-cnn", "--weights", str(digits_cnn[0]),
            "--cache", str(cache), "--json", "--quiet"]
    assert main(argv) == 0
    records = json.loads(capsys.readouterr().out)
    assert [(r["mask"], r["metric"]) for r in records] == [
        (m, k) for m in ("random:0.25", "random:0.75", "box:center") for k in ("token_accuracy", "psnr", "fd")]
    by = {(r["mask"], r["metric"]): r for r in records}
    assert by["random:0.25", "token_accuracy"]["mask_ratio"] == 0.25  # ceil(0.25 * 64) = 16 of 64
    assert by["box:center", "psnr"]["mask_family"] == "box" and by["box:center", "psnr"]["mask_ratio"] > 0
    assert all(r["n_samples"] == 40 and r["steps"] == 3 and r["argmax"] is False for r in records)
    assert all(0 <= by[m, "token_accuracy"]["value"] <= 1 for m in ("random:0.25", "random:0.75"))
    fd = by["random:0.25", "fd"]
    assert fd["feature_extractor"] == "digits-cnn" and fd["standard_extractor"] is False and fd["value"] > 0
    assert by["random:0.25", "psnr"]["feature_extractor"] == "none" and "psnr_ceiling" in by["random:0.25", "psnr"]
    grid = tiny_run / by["box:center", "psnr"]["grid"]
    assert grid.is_file() and len(list((grid.parent / "images").glob("*.png"))) == 40
    assert not list((tiny_run / "inpaint").glob(".*"))  # no staging left behind
    stored = json.loads((tiny_run / "eval" / "inpaint.json").read_text())
    assert [r["value"] for r in stored] == [r["value"] for r in records]

    # Resume: the same inputs are read back without decoding anything.
    settings = from_dict(EvalConfig, {"inpaint": ["random:0.25", "random:0.75", "box:center"], "inpaint_images": 40,
                                      "inpaint_steps": 3, "extractor": "digits-cnn", "weights": str(digits_cnn[0])},
                         "eval")

    def refuse(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(inpainting, "complete_batch", refuse)
    again = evaluate_inpainting(tiny_run, settings, cache_dir=cache, resume=True)
    assert [r["value"] for r in again] == [r["value"] for r in records]
    with pytest.raises(AssertionError, match="decoded again"):  # other settings: computed again
        evaluate_inpainting(tiny_run, from_dict(EvalConfig, {**settings.__dict__, "inpaint_temperature": 1.0},
                                                "eval"), cache_dir=cache, resume=True)
    monkeypatch.undo()

    # A sweep's eval settings with masks: `eval all` writes the inpaint records too (without FD here).
    sweep_settings = from_dict(EvalConfig, {"inpaint": ["random:0.5"], "inpaint_images": 20, "inpaint_fd": False,
                                            "num_samples": 20, "extractor": "digits-cnn",
                                            "weights": str(digits_cnn[0])}, "eval")
    written = evaluate_all(tiny_run, sweep_settings, flags=("fid",), cache_dir=cache, resume=True)
    assert [r["metric"] for r in written["inpaint"]] == ["token_accuracy", "psnr"]
    assert json.loads((tiny_run / "eval" / "inpaint.json").read_text())[0]["mask"] == "random:0.5"


def test_eval_inpaint_bad_input_is_one_line(tiny_run, capsys):
    assert main(["eval", "inpaint", "--run", str(tiny_run), "--quiet"]) == 2
    assert "no masks to evaluate" in capsys.readouterr().err
    assert main(["eval", "inpaint", "--run", str(tiny_run), "--masks", "random:0.4,random:0", "--no-fd", "--quiet"]) == 2
    assert "mask random:0 leaves no token unknown" in capsys.readouterr().err
    assert not list(tiny_run.glob("inpaint/random-0.4-*"))  # checked before any mask was decoded
    assert main(["eval", "knn", "--run", str(tiny_run), "--masks", "random:0.5", "--quiet"]) == 2
    assert "--masks applies to `eval inpaint`" in capsys.readouterr().err


def test_a_sweeps_inpaint_settings_reach_its_evaluation_job(tmp_path):
    from mage_bench.run_job import EvaluationJob, build_parser
    from mage_bench.sweep_spec import load_spec

    settings = EvalConfig(inpaint=("random:0.5", "box:center"), inpaint_images=10, inpaint_argmax=True)
    job = EvaluationJob(tmp_path / "run", settings, "s", tmp_path / "cache", "cpu")
    assert EvaluationJob.from_args(build_parser().parse_args(["evaluate", *job.argv()])) == job
    spec = load_spec("masking", preset="tiny")
    assert spec.eval.inpaint == ("random:0.25", "random:0.5", "random:0.75", "box:center")


def test_a_diverged_model_still_keeps_the_known_tokens(model, monkeypatch):
    tokens = torch.randint(0, 32, (2, 64), generator=torch.Generator().manual_seed(4))
    unknown = torch.zeros(2, 64, dtype=torch.bool)
    unknown[:, :20] = True
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda *a: original(*a) * float("nan"))
    out = complete_tokens(model, tokens, unknown, decoding_noise(0, range(2), 6, 64), 6, 4.5)
    assert torch.equal(out[~unknown], tokens[~unknown])


@pytest.mark.parametrize("argv,message", [
    (["--mask", "random:0.5", "--dilate", "1"], "--dilate grows pixel masks"),
    (["--images", "FOLDER", "--split", "train"], "--split applies to a data set"),
])
def test_inpaint_flags_that_would_do_nothing_are_refused(tiny_run, tmp_path, capsys, argv, message):
    argv = [str(tmp_path) if a == "FOLDER" else a for a in argv]
    base = {"--run": str(tiny_run), "--images": "digits", "--mask": "box:center", "--out": str(tmp_path / "out")}
    base.update(dict(zip(argv[::2], argv[1::2], strict=True)))
    assert main(["inpaint", *[x for kv in base.items() for x in kv], "--quiet"]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,message", [
    (["eval", "all", "--argmax"], "--inpaint-argmax needs --masks with `eval all`"),
    (["eval", "inpaint", "--masks", "random:0.5", "--real", "digits"], "--real applies to `eval fid`"),
    (["eval", "inpaint", "--masks", "random:0.5", "--isc"], "--isc applies to `eval fid`"),
    (["eval", "linear", "--dilate", "1"], "--inpaint-dilate applies to `eval inpaint`"),
])
def test_eval_inpaint_flags_out_of_place_are_one_line_errors(tiny_run, capsys, argv, message):
    assert main([*argv, "--run", str(tiny_run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_failed_inpaint_command_leaves_no_output(tiny_run, tmp_path, monkeypatch):
    from mage_bench import inpainting

    calls = []
    real = inpainting.complete_batch

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(inpainting, "complete_batch", fail_second)
    with pytest.raises(RuntimeError, match="killed"):
        inpainting.inpaint_images(tiny_run, "digits", "box:center", tmp_path / "out", num=100, steps=2,
                                  progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_failed_evaluation_keeps_the_old_images_and_records_together(tiny_run, monkeypatch):
    from mage_bench import inpainting
    from mage_bench.eval.inpaint import evaluate_inpainting

    settings = EvalConfig(inpaint=("random:0.3", "box:half-top"), inpaint_images=8, inpaint_steps=2,
                          inpaint_fd=False)
    first = evaluate_inpainting(tiny_run, settings)
    folders = sorted(p.name for p in (tiny_run / "inpaint").iterdir())
    grid = (tiny_run / first[0]["grid"]).read_bytes()
    calls = []
    real = inpainting.complete_batch

    def fail_on_the_second_mask(run, images, indices, mask, *args, **kwargs):
        if mask.spec == "box:half-top":
            raise RuntimeError("killed")
        calls.append(mask.spec)
        return real(run, images, indices, mask, *args, **kwargs)

    monkeypatch.setattr(inpainting, "complete_batch", fail_on_the_second_mask)
    with pytest.raises(RuntimeError, match="killed"):  # other settings, failing half-way
        evaluate_inpainting(tiny_run, EvalConfig(**{**settings.__dict__, "inpaint_temperature": 0.5}))
    assert calls == ["random:0.3"]  # the first mask was completed, but nothing of it was published
    assert sorted(p.name for p in (tiny_run / "inpaint").iterdir()) == folders  # no staging left either
    assert (tiny_run / first[0]["grid"]).read_bytes() == grid
    assert json.loads((tiny_run / "eval" / "inpaint.json").read_text())[0]["value"] == first[0]["value"]
    monkeypatch.undo()
    # A later evaluation with fewer masks removes the folders of the masks it no longer reports.
    evaluate_inpainting(tiny_run, EvalConfig(**{**settings.__dict__, "inpaint": ("random:0.3",)}))
    assert [p.name for p in (tiny_run / "inpaint").iterdir()] == [folders[1]] and folders[1].startswith("random")


def test_a_sweep_refuses_masks_that_do_not_fit_before_training(tmp_path, capsys, tiny_tokenizer_dir, digits_cnn):
    from test_sweep import micro_spec

    mask = _one_pixel_mask(tmp_path, 1, 1, size=8)  # the sweep's images are 16 px
    path = micro_spec(tmp_path, tiny_tokenizer_dir, digits_cnn, eval_extra={"inpaint": [f"pixels:{mask}"]})
    assert main(["sweep", str(path), "--runs", str(tmp_path / "runs"), "--dry-run"]) == 2
    assert "is 8x8 but the images are 16x16" in capsys.readouterr().err
    path = micro_spec(tmp_path, tiny_tokenizer_dir, digits_cnn, eval_extra={"inpaint": ["random:0"]})
    assert main(["sweep", str(path), "--runs", str(tmp_path / "runs")]) == 2
    assert "mask random:0 leaves nothing unknown" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
