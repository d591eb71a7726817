"""Masked reconstruction as an evaluator: inpainting, outpainting and reconstruction across masking ratios.

`mage-bench eval inpaint --run R --masks random:0.25,random:0.5,box:center,border:4` (a sweep's
`eval.inpaint`) completes the run's first `inpaint_images` test images under each mask
(`mage_bench.inpainting.complete_batch`) and records, per mask (RUN/eval/inpaint.json, evaluator `inpaint`):

- `token_accuracy`: the share of unknown tokens decoded to the intact image's own token (pooled over images);
- `psnr`: PSNR (dB, peak 1) of the completed image on the unknown pixels, per image then averaged; beside it
  `psnr_ceiling`, the same for the tokenizer's own reconstruction of the intact image: a reference, what
  decoding the intact image's own tokens gives on those pixels;
- `fd`: the Fréchet distance of the completed images (written as PNGs under RUN/inpaint/<mask>/images, with
  the run's PNG quantisation) against the real split (`real_split`), with the extractor and backend `eval fid`
  would use (FID only with the standard Inception weights; else "FD", named with its extractor).

Every record carries the mask (`mask`, `mask_family`, `mask_ratio`: the realised mean share of unknown
tokens), the decoding settings (`steps`, `temperature`, `argmax`, `paste_back`, and `dilate` as applied:
0 for token masks), a pixel mask file's `mask_sha256`, and `grid`, the run-relative path of a PNG of the
first images (originals, masked inputs and completions in three rows). Images and records are published
together, after every mask is done. With `resume` the records are read back when their inputs
(checkpoint, data, settings, masks and mask files) are unchanged.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mage_bench.metrics import Metric

EVALUATOR = "inpaint"
METRICS = (Metric("token_accuracy", True, "token accuracy (unknown tokens)"),
           Metric("psnr", True, "PSNR of the unknown pixels (dB)"),
           Metric("fd", False, "FID of completed images", nonstandard_label="FD of completed images"))
FOLDER = "inpaint"  # RUN/inpaint/<mask>/{images/, grid.png}
PANEL_IMAGES = 6  # images (rows of triplets) in each mask's grid
# The EvalConfig fields the records depend on (what `resume` compares), besides the masks themselves
SETTINGS = ("inpaint_images", "inpaint_steps", "inpaint_temperature", "inpaint_argmax", "inpaint_paste_back",
            "inpaint_dilate", "inpaint_fd", "real_split", "extractor", "weights", "backend")
MIN_MSE = 1e-10  # a pixel-perfect completion counts as 100 dB rather than infinity


@dataclass
class Tally:
    """Running sums of one mask's metrics over batches."""

    correct: int = 0
    unknown: int = 0
    images: int = 0
    psnr: float = 0.0
    ceiling: float = 0.0

    def add(self, done: Any) -> None:
        per_image = done.unknown_tokens.sum(dim=1)
        if bool((per_image == 0).any()):
            i = done.indices[int((per_image == 0).nonzero()[0])]
            raise_nothing_unknown(i)
        self.correct += int(((done.result_tokens == done.original_tokens) & done.unknown_tokens).sum())
        self.unknown += int(per_image.sum())
        self.images += len(done.indices)
        self.psnr += float(psnr(done.result, done.original, done.unknown_pixels).sum())
        self.ceiling += float(psnr(done.reconstruction, done.original, done.unknown_pixels).sum())

    def ratio(self, tokens_per_image: int) -> float:
        return self.unknown / (self.images * tokens_per_image)


def raise_nothing_unknown(index: int) -> None:
    from mage_bench.errors import UserError

    raise UserError(f"the mask leaves no token unknown in test image {index}; nothing to complete "
                    "(choose a ratio above 0 or a larger region)")


def psnr(images: Any, reference: Any, unknown_pixels: Any) -> Any:
    """float[B]: PSNR (peak 1) of `images` against `reference` over each image's unknown pixels (3 channels)."""
    weight = unknown_pixels[:, None].expand_as(images).float()
    mse = (((images.float() - reference.float()) ** 2) * weight).sum(dim=(1, 2, 3)) / weight.sum(dim=(1, 2, 3))
    return 10 * (1 / mse.clamp(min=MIN_MSE)).log10()


def mask_folder(spec: str) -> str:
    """RUN/inpaint/<this>: readable and unique per spec (a short digest tells long file masks apart)."""
    import hashlib

    from mage_bench.io import slug

    return f"{slug(spec, limit=40, empty='mask')}-{hashlib.sha256(spec.encode()).hexdigest()[:6]}"


def evaluate_inpainting(run_dir: str | Path | Any, settings: Any, masks: tuple[str, ...] | None = None,
                        data_name: str | None = None, cache_dir: str | Path | None = None, progress: bool = False,
                        sweep: str | None = None, resume: bool = False) -> list[dict[str, Any]]:
    """Complete the run's test images under each mask (`masks`, else `settings.inpaint`); write and return
    the records (RUN/eval/inpaint.json)."""
    from mage_bench.errors import UserError
    from mage_bench.eval import inputs as resume_inputs
    from mage_bench.inpainting import check_mask, decoding_of
    from mage_bench.io import sha256_file
    from mage_bench.mage.inpaint_masks import parse_masks
    from mage_bench.results import config_hash, read_records, write_records
    from mage_bench.runs import LoadedRun, load_run, resolve_device

    masks = tuple(masks if masks is not None else settings.inpaint)
    if not masks:
        raise UserError("no masks to evaluate; e.g. --masks random:0.25,random:0.5,random:0.75,box:center,border:4")
    parsed = parse_masks(masks)  # typos fail before the run is loaded
    device = resolve_device(settings.device)
    run = run_dir if isinstance(run_dir, LoadedRun) else load_run(run_dir, device)
    data = resume_inputs.run_data_config(run.config, data_name)
    decoding = decoding_of(run, settings.inpaint_steps, settings.inpaint_temperature, settings.inpaint_argmax,
                           settings.inpaint_paste_back, settings.inpaint_dilate, run.config.seed)
    for mask in parsed:
        check_mask(run, mask, decoding, evaluating=True)
    splits = ("test", settings.real_split) if settings.inpaint_fd else ("test",)
    datasets = resume_inputs.evaluation_datasets(data, tuple(dict.fromkeys(splits)))
    files = {m.spec: sha256_file(m.where) for m in parsed if m.family == "pixels"}
    inputs = resume_inputs.evaluation_inputs(run, EVALUATOR, data, resume_inputs.identities_of(datasets), settings,
                                             sweep, config_hash(run.config), SETTINGS,
                                             masks=[m.spec for m in parsed], mask_files=files)
    path = resume_inputs.records_path(run, EVALUATOR)
    if resume and resume_inputs.inputs_match(run, EVALUATOR, inputs):
        return read_records(path)
    fd = FdSide.plan(run, data, settings, cache_dir, progress) if settings.inpaint_fd else None
    test = datasets["test"]
    count = min(settings.inpaint_images, len(test))
    root = run.path / FOLDER
    _remove_leftovers(root)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        records = []
        for mask in parsed:
            records += _evaluate_mask(run, test, count, mask, decoding, fd, data, sweep, device, progress,
                                      staging / mask_folder(mask.spec), files.get(mask.spec))
        # The images and the records change together: the old inputs go first (a crash from here on leaves
        # records nothing vouches for, recomputed by a resume), then the folders, then the records.
        resume_inputs.inputs_path(run, EVALUATOR).unlink(missing_ok=True)
        _publish(staging, root)
        write_records(path, records)
        resume_inputs.remember_inputs(run, EVALUATOR, inputs)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [r.as_dict() for r in records]


def _remove_leftovers(root: Path) -> None:
    """Staging and superseded folders of an evaluation killed mid-way (one evaluation per run at a time)."""
    for leftover in [*root.glob(".staging-*"), *root.glob(".*.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def _publish(staging: Path, root: Path) -> None:
    """Every mask folder of `staging` in place of its older copy; folders of masks no longer evaluated go."""
    from mage_bench.inpainting import replace_folder

    fresh = {folder.name for folder in staging.iterdir()}
    for folder in root.iterdir():
        if folder.is_dir() and not folder.name.startswith(".") and folder.name not in fresh:
            shutil.rmtree(folder)
    for name in sorted(fresh):
        replace_folder(staging / name, root / name)


@dataclass(frozen=True)
class FdSide:
    """What the FD of completed images needs, resolved once per evaluation: the extractor, its weights, the
    backend and the real images."""

    extractor: Any
    weights: Path
    real: Any  # ImageSet
    real_split: str
    cache: Path
    backend: str

    @classmethod
    def plan(cls, run: Any, data: Any, settings: Any, cache_dir: str | Path | None, progress: bool) -> FdSide:
        from mage_bench.eval.extractors import FID_EXTRACTORS
        from mage_bench.eval.generation import check_generation_inputs, default_extractor
        from mage_bench.eval.image_sets import DEFAULT_CACHE, dataset_reference

        weights = check_generation_inputs(settings, data.name, ("fid",), progress, allow_download=True)
        extractor = FID_EXTRACTORS.get(settings.extractor or default_extractor(data.name))
        cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
        real = dataset_reference(data, settings.real_split, cache, progress)
        return cls(extractor, weights, real, settings.real_split, cache, settings.backend)

    def distance(self, fake: Any, seed: int, device: str, progress: bool) -> float:
        from mage_bench.eval.fid_backends import Request, compute_metrics

        request = Request(fake=fake, real=self.real, metrics=frozenset({"fid"}), extractor=self.extractor,
                          weights=self.weights, device=device, cache_dir=self.cache, seed=seed, progress=progress)
        return compute_metrics(request, self.backend)["fid"]


def _evaluate_mask(run: Any, test: Any, count: int, mask: Any, decoding: Any, fd: FdSide | None, data: Any,
                   sweep: str | None, device: str, progress: bool, folder: Path,
                   mask_sha256: str | None = None) -> list[Any]:
    """One mask: complete `count` test images, tally, write the completed PNGs and the grid into `folder` (a
    staging folder), then the records."""
    import sys

    from tqdm import tqdm

    from mage_bench.eval.image_sets import scan_folder
    from mage_bench.inpainting import batches, complete_batch, loader_workers, save_grid, triplet_rows
    from mage_bench.mage.inpaint_masks import PIXEL
    from mage_bench.results import RecordContext, build_records, config_hash
    from mage_bench.samples import png_pool, to_uint8, write_pngs

    png = run.config.generate.png
    tally, tiles = Tally(), []
    (folder / "images").mkdir(parents=True)
    bar = tqdm(total=count, desc=f"inpaint {mask.spec}", unit="img", file=sys.stderr, disable=not progress)
    with png_pool() as pool:
        for indices, images in batches(test, count, loader_workers(data, test)):
            done = complete_batch(run, images, indices, mask, decoding, device)
            tally.add(done)
            tiles += triplet_rows(done, PANEL_IMAGES - len(tiles) // 3)
            arrays = to_uint8(done.result, png).permute(0, 2, 3, 1).numpy()
            write_pngs([(folder / "images" / f"{i:06d}.png", a) for i, a in zip(indices, arrays, strict=True)],
                       pool, atomic=False)  # the folder is published whole
            bar.update(len(indices))
    bar.close()
    save_grid(tiles, folder / "grid.png", png, by_image=False)  # wide and short: a report table cell
    distance = fd.distance(scan_folder(folder / "images"), decoding.seed, device, progress) if fd else None
    settings = decoding.fields()
    # What was applied to this mask: dilation grows pixel masks only.
    settings.update(dilate=decoding.dilate if mask.space == PIXEL else 0)
    settings.pop("seed")  # the record's own `seed`
    common = {"mask": mask.spec, "mask_family": mask.family, "mask_ratio": tally.ratio(run.config.model.num_tokens),
              **settings, "grid": f"{FOLDER}/{folder.name}/grid.png"}
    if mask_sha256:
        common["mask_sha256"] = mask_sha256
    context = dict(evaluator=EVALUATOR, run=run.path.name, dataset=data.name, split="test", n_samples=tally.images,
                   seed=run.config.seed, config_hash=config_hash(run.config), sweep=sweep)
    records = build_records(RecordContext(feature_extractor="none", **context), METRICS, [
        ("token_accuracy", tally.correct / tally.unknown, common),
        ("psnr", tally.psnr / tally.images, {**common, "psnr_ceiling": tally.ceiling / tally.images})])
    if distance is not None:
        fd_fields = {**common, "n_real": fd.real.count, "real_split": fd.real_split,
                     "standard_extractor": fd.extractor.standard, "backend": fd.backend}
        records += build_records(RecordContext(feature_extractor=fd.extractor.name, **context), METRICS,
                                 [("fd", distance, fd_fields)])
    if not all(math.isfinite(r.value) for r in records):
        from mage_bench.errors import UserError

        raise UserError(f"mask {mask.spec}: a metric came out non-finite; the model or tokenizer diverged")
    return records
