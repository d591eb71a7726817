"""The faithful MAE/MAGE linear probe (`--protocol mae`): fresh augmented views through the frozen encoder.

Every epoch each training image gets a new random view, is tokenized by the run's tokenizer and
passed through the frozen MAGE encoder (`features.probe_features`, the same probe feature as the
cached path, under `torch.no_grad`), and the BN + Linear head takes its LARS steps on those features
(`linear.train_mae_head`, shared with `--protocol mae-cached`). Test images take one fixed view.

Views (REFERENCE.md, "Evaluation protocols"):
- training, folder data sets (imagefolder, cifar10): RandomResizedCrop(size, scale 0.2-1, ratio 3/4-4/3,
  bicubic) + horizontal flip, cropped from the decoded original image, as the official probe does;
- training, in-memory data sets (the bundled 16 px digits): the same crop family WITHOUT the flip,
  because a mirrored digit is another glyph (2, 3, 7 have no mirror class); this departs from the
  official recipe on purpose and every record says so in its `augment` field;
- test: Resize(round(size * 292 / 256), bicubic) + CenterCrop(size), the official 292 -> 256 view.

Encoder batches: `EvalConfig.feature_batch_size(image_size)` images per tokenizer + encoder call (the
`encode_batch` argument, else sized by resolution as for cached features), whatever the head's batch: a
4096-image head batch of 256 px views would not fit through the VQGAN at once.

Determinism: the view of image `index` in `epoch` is drawn from its own generator, seeded from
(seed, epoch, index), so it does not depend on the batch size, the shuffle or DataLoader workers,
and two epochs see different views. One more seeded generator draws the head's weights and each
epoch's shuffle, exactly as in `--protocol mae-cached`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from mage_bench.config import DataConfig
from mage_bench.eval.linear import HeadSchedule, head_result, train_mae_head
from mage_bench.metrics import Metric

# Records of the paper-protocol probes (`linear-mae` here, `linear-mae-cached` on cached features).
PROBE_METRICS = (Metric("top1", True, "linear probe (paper protocol) top-1"),
                 Metric("top5", True, "linear probe (paper protocol) top-5"))

CROP_SCALE, CROP_RATIO = (0.2, 1.0), (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10  # tries for a box inside the image before the centred fallback
EVAL_RESIZE_RATIO = 292 / 256  # the official test view: resize to 292, centre-crop 256
AUGMENT_FOLDER = "random-resized-crop(scale=0.2-1,bicubic)+hflip"
AUGMENT_IN_MEMORY = "random-resized-crop(scale=0.2-1,bicubic),no-flip"
TEST_VIEW = "resize(292/256,bicubic)+center-crop"


def eval_resize(size: int) -> int:
    """The shorter side before the centre crop of the test view: 292 for 256, the same ratio otherwise."""
    return round(size * EVAL_RESIZE_RATIO)


def view_generator(seed: int, epoch: int, index: int) -> Any:
    """The generator of image `index`'s view in `epoch`: a hash of the three, so views are independent
    of the order images are visited in."""
    import torch

    state = np.random.SeedSequence([v % 2**64 for v in (seed, epoch, index)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def sample_crop(height: int, width: int, generator: Any) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of a random resized crop: area a uniform share of the image in
    CROP_SCALE, log aspect ratio uniform in CROP_RATIO; after CROP_ATTEMPTS misses, the largest centred
    box whose aspect ratio lies in CROP_RATIO."""
    import torch

    draws = torch.rand(CROP_ATTEMPTS, 4, generator=generator, dtype=torch.float64).tolist()
    log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for area_u, ratio_u, top_u, left_u in draws:
        area = height * width * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * area_u)
        aspect = math.exp(log_low + (log_high - log_low) * ratio_u)
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(top_u * (height - h + 1)), int(left_u * (width - w + 1)), h, w
    aspect = min(max(width / height, CROP_RATIO[0]), CROP_RATIO[1])  # the image's own, clamped into range
    # Too tall an image keeps its width, too wide one its height; one in range is kept whole.
    w, h = (width, round(width / aspect)) if width / height <= aspect else (round(height * aspect), height)
    return (height - h) // 2, (width - w) // 2, h, w


def _to_tensor(image: Any) -> Any:
    """float[3, H, W] in [0, 1]: PIL images are converted; tensors are clamped, as bicubic overshoots."""
    import torch
    from torchvision.transforms import functional as TF

    return image.clamp(0.0, 1.0) if isinstance(image, torch.Tensor) else TF.to_tensor(image)


def train_view(image: Any, size: int, generator: Any, flip: bool) -> Any:
    """A random training view float[3, size, size] of one image (PIL, or a tensor [3, H, W] in [0, 1])."""
    import torch
    from torchvision.transforms import functional as TF

    width, height = TF.get_image_size(image)
    top, left, h, w = sample_crop(height, width, generator)
    view = TF.resized_crop(image, top, left, h, w, [size, size], interpolation=TF.InterpolationMode.BICUBIC)
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        view = TF.hflip(view)
    return _to_tensor(view)


def eval_view(image: Any, size: int) -> Any:
    """The test view float[..., 3, size, size] of a PIL image or of tensors [..., 3, H, W] in [0, 1]."""
    from torchvision.transforms import functional as TF

    resized = TF.resize(image, [eval_resize(size)], interpolation=TF.InterpolationMode.BICUBIC)
    return _to_tensor(TF.center_crop(resized, [size, size]))


def tensor_train_views(images: Any, indices: Any, seed: int, epoch: int, size: int) -> Any:
    """Training views float[B, 3, size, size] of in-memory images[indices] (no flip: see the module doc)."""
    import torch

    return torch.stack([train_view(images[i], size, view_generator(seed, epoch, i), flip=False)
                        for i in indices.tolist()])


def _keep_image(image: Any) -> Any:
    return image


class FolderViews:
    """A folder data set's images as views: `epoch` None gives the test view, else that epoch's training view.

    `base` must yield (PIL image, label): see `open_split`."""

    def __init__(self, base: Any, size: int, seed: int, epoch: int | None) -> None:
        self.base, self.size, self.seed, self.epoch = base, size, seed, epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.base[index]
        if self.epoch is None:
            return eval_view(image, self.size), label
        return train_view(image, self.size, view_generator(self.seed, self.epoch, index), flip=True), label


def open_split(data: DataConfig, split: str) -> Any:
    """The split's data set, untransformed: tensors for in-memory sets, PIL images for folder sets."""
    from mage_bench.data import create_dataset, is_in_memory

    dataset = create_dataset(data, split, train_transform=False)
    if not is_in_memory(data):
        # Folder sets apply `transform` to the decoded PIL image; the views replace it, so every crop is
        # taken from the original image (as the official probe does), not from a resized copy.
        dataset.transform = _keep_image
    return dataset


def _encode(run: Any, images: Any, device: str, encode_batch: int) -> Any:
    """Probe features float[B, D] on `device`, `encode_batch` images per tokenizer + encoder call."""
    import torch

    from mage_bench.eval.features import probe_features

    with torch.no_grad():
        return torch.cat([probe_features(run, part.to(device)) for part in images.split(encode_batch)])


def _image_batches(dataset: Any, data: DataConfig, order: Any, batch_size: int, seed: int,
                   epoch: int | None) -> Iterator[tuple[Any, Any]]:
    """(views float[B, 3, S, S], labels long[B]) over `order` in batches; `epoch` None: the test view."""
    import torch

    from mage_bench.data import is_in_memory

    size = data.image_size
    if is_in_memory(data):  # tensors already in this process: no loader
        images, labels = dataset.tensors()
        for batch in order.split(batch_size):
            views = eval_view(images[batch], size) if epoch is None else \
                tensor_train_views(images, batch, seed, epoch, size)
            yield views, labels[batch]
        return
    loader = torch.utils.data.DataLoader(FolderViews(dataset, size, seed, epoch), batch_size=batch_size,
                                         sampler=order.tolist(), num_workers=data.num_workers)
    yield from loader


def linear_probe_mae_views(run: Any, data: DataConfig, seed: int = 0, epochs: int = 90,
                           warmup_epochs: int | None = None, batch_size: int = 4096, blr: float = 0.1,
                           device: str = "cpu", progress: bool = False,
                           encode_batch: int | None = None) -> dict[str, Any]:
    """The faithful linear probe of a `LoadedRun` on `data` (see the module doc).

    `encode_batch`: images per tokenizer + encoder call; None: `EvalConfig.feature_batch_size` of the
    data's image size. Returns {"top1", "top5", "lr", "epochs", "warmup_epochs", "batch_size", "augment", "test_view",
    "n_test"}. Each epoch costs one tokenizer + encoder pass over the training split.
    """
    import torch
    from tqdm import tqdm

    from mage_bench.config import DEFAULT_EVAL
    from mage_bench.data import is_in_memory

    schedule = HeadSchedule(epochs, batch_size, blr, warmup_epochs).checked("linear-mae")
    encode_batch = encode_batch or DEFAULT_EVAL.feature_batch_size(data.image_size)
    train_set, test_set = open_split(data, "train"), open_split(data, "test")
    generator = torch.Generator().manual_seed(seed)

    def epoch_batches(epoch: int) -> Iterable[tuple[Any, Any]]:
        order = torch.randperm(len(train_set), generator=generator)
        for views, labels in _image_batches(train_set, data, order, schedule.batch_size, seed, epoch):
            yield _encode(run, views, device, encode_batch), labels.to(device)

    probe = train_mae_head(epoch_batches, run.config.model.embed_dim, len(train_set.classes), len(train_set),
                           schedule, generator, device, progress)
    test_batches = _image_batches(test_set, data, torch.arange(len(test_set)), encode_batch, seed, None)
    features, labels = zip(*((_encode(run, views, device, encode_batch), labels) for views, labels in
                             tqdm(test_batches, desc="linear probe test views", unit="batch", file=sys.stderr,
                                  disable=not progress)), strict=True)
    result = head_result(probe, torch.cat(features), torch.cat(labels).numpy(), schedule)
    augment = AUGMENT_IN_MEMORY if is_in_memory(data) else AUGMENT_FOLDER
    return {**result, "augment": augment, "test_view": TEST_VIEW, "n_test": len(test_set)}
