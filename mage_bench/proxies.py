"""Training-time proxies: two cheap numbers logged while MAGE trains, to see how early a sweep's ranking settles.

Every `train.proxy_every` steps and at the last step, rank 0 adds to that step's metrics.jsonl line:

- `proxy_knn_top1`: DINO's weighted kNN top-1 (k=20, T=0.07: `eval.knn.knn_classify`) of the probe feature
  (`MAGE.features`, as `eval.features.probe_features`: fp32 tokens, the model in eval mode, no grad), with
  up to `train.proxy_knn_train` train images as the memory and up to `train.proxy_knn_test` test images as
  the queries. The images are one fixed draw (PROXY_SEED: the same images for every run and seed of a
  sweep, so the points are scored alike) in the evaluation view, tokenised once and kept as tokens.
- `proxy_fd`: the Fréchet distance (`eval.fid.frechet_distance`) between the run's cheap extractor's
  features of `train.proxy_samples` images decoded by `iterative_decode` (the run's `generate` settings;
  per-image noise from the run's seed, so the same K noises every time) and of as many real train images
  (the first of the same fixed draw; their features are computed once). The extractor is the evaluation's
  default for the data set (`eval.generation.default_extractor`): digits-cnn for the digits; otherwise
  Inception-v3 when its weights are on this machine (never downloaded mid-training), else the FD proxy is
  skipped with one warning line. A hundred-odd samples make a biased FD, far above the evaluation's: it is
  read for the ranking of runs, never as a score.

Beside them the line names the sample sizes and the extractor (`proxy_knn_train`, `proxy_knn_test`,
`proxy_fd_samples`, `proxy_fd_extractor`, and `proxy_fd_weights`: the start of its weights' sha256), so a report
can say what the numbers are. The weights are looked up where the run (re)starts (digits-cnn: models/digits-cnn
under the working folder), so a run resumed elsewhere may gain, lose or change its FD proxy: the key shows it.

Training is untouched: every draw comes from its own generator or the fixed noise, the global random state
(the CPU's and the device's) is restored afterwards (`torch.random.fork_rng`, which also covers the
extractor's layers drawing their initial weights when built), the model goes back to its mode, nothing
gets a gradient and the optimizer is never seen: a run with proxies ends with bitwise the weights of one
without (tests/test_proxies.py). A proxy line is a log line, so resuming rewinds it with the others
(`rewind_jsonl`) and recomputes it from the same weights: the same value.

torch is imported inside the functions: the report (which never imports torch) reads `PROXIES` from here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mage_bench.config import DEFAULT_EVAL, RunConfig, TrainConfig

if TYPE_CHECKING:
    import torch

PROXY_SEED = 0  # the held-out draw: fixed, so every run of a sweep is scored on the same images
KNN_K, KNN_TEMPERATURE = 20, 0.07  # the evaluation's headline kNN (`knn` records with k=20)
KNN_KEY, FD_KEY = "proxy_knn_top1", "proxy_fd"
KNN_TRAIN_KEY, KNN_TEST_KEY = "proxy_knn_train", "proxy_knn_test"
FD_SAMPLES_KEY, FD_EXTRACTOR_KEY = "proxy_fd_samples", "proxy_fd_extractor"
# The extractor weights' sha256 (first 16 hex digits): which weights are found is decided where the run (re)starts
# (digits-cnn lies under the working folder's models/), so a resumed run says whether its FD proxy changed.
FD_WEIGHTS_KEY = "proxy_fd_weights"


@dataclass(frozen=True)
class Proxy:
    """A proxy as the report reads it: its metrics.jsonl key and the final metric it stands in for."""

    key: str
    label: str
    higher_is_better: bool
    final: str  # the key of the report's headline metric (`report.collate.HEADLINES`) it predicts


PROXIES = (Proxy(KNN_KEY, f"kNN top-1 (k={KNN_K})", True, "knn"), Proxy(FD_KEY, "FD", False, "fid"))


def knn_enabled(train: TrainConfig) -> bool:
    return train.proxy_knn_train > 0 and train.proxy_knn_test > 0


def proxies_enabled(train: TrainConfig) -> bool:
    return train.proxy_every > 0 and (knn_enabled(train) or train.proxy_samples > 0)


def proxy_due(step: int, train: TrainConfig) -> bool:
    """Whether the proxies are computed after `step` steps: every `proxy_every` and at the last step."""
    return proxies_enabled(train) and (step % train.proxy_every == 0 or step == train.steps)


def _images(dataset: Any, indices: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """(float [N, 3, H, W] in [0, 1], int64 labels [N]) of the data set's items at `indices`."""
    import torch

    if hasattr(dataset, "tensors"):  # in memory: one indexing instead of N items
        images, labels = dataset.tensors()
        picked = torch.as_tensor(indices)
        return images[picked], np.asarray(labels[picked], dtype=np.int64)
    items = [dataset[int(i)] for i in indices]
    return torch.stack([image for image, _ in items]), np.array([label for _, label in items], dtype=np.int64)


def _local_weights(name: str) -> Any:
    """The extractor's weights where the evaluation finds them by default, already on this machine: a
    UserError saying how to get them otherwise. Training fetches nothing and trains no digits-cnn (that
    would write into models/ mid-run); a sweep makes them before its first run (`check_evaluation_inputs`)."""
    from mage_bench.errors import UserError
    from mage_bench.eval.extractors import DIGITS_CNN_DIR, DIGITS_CNN_FILE, FID_EXTRACTORS

    if name == "digits-cnn":
        weights = DIGITS_CNN_DIR / DIGITS_CNN_FILE
        if not weights.is_file():
            raise UserError(f"digits-cnn weights are not at {weights} yet; `mage-bench eval fid` (or a sweep) "
                            "trains them there once (~15 s)")
        return weights
    return FID_EXTRACTORS.get(name).resolve_weights(None, allow_download=False)


def _extractor(name: str, weights: Any, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 images [B, 3, H, W] -> the extractor's FD features [B, D], as the torch-fidelity backend
    computes them (digits-cnn: its standardised penultimate layer; Inception: pool3 after its own resize)."""
    from mage_bench.eval import extractors

    if name == "digits-cnn":  # loaded directly: importing torch-fidelity costs seconds, a short run's share
        net = extractors.load_digits_cnn(weights, str(device))
    else:
        net = extractors._inception_network(weights, str(device))
    return lambda images: net(images)[0]


class TrainingProxies:
    """The proxies of one run, computed on rank 0 (`__call__`); the held-out data are set up on first use."""

    def __init__(self, config: RunConfig, model: torch.nn.Module, tokenizer: torch.nn.Module,
                 device: torch.device) -> None:
        self.config, self.model, self.tokenizer, self.device = config, model, tokenizer, device
        self.batch = DEFAULT_EVAL.feature_batch_size(config.data.image_size)
        self.ready = False

    def due(self, step: int) -> bool:
        return proxy_due(step, self.config.train)

    def __call__(self, step: int) -> dict[str, Any]:
        """The proxy keys of step `step`'s metrics.jsonl line."""
        import torch

        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            if not self.ready:
                self._setup()
            was_training = self.model.training
            self.model.eval()
            try:
                return {**self._knn(), **self._fd()}
            finally:
                self.model.train(was_training)

    # ----------------------------------------------------------------------------------------
    # Set-up: the fixed draws, their tokens and the real side's features (once)

    def _setup(self) -> None:
        from mage_bench.data import create_dataset
        from mage_bench.mage.generate import decoding_noise

        t, data = self.config.train, self.config.data
        train_set = create_dataset(data, "train", train_transform=False)
        order = np.random.default_rng(PROXY_SEED).permutation(len(train_set))
        n_memory = min(t.proxy_knn_train, len(train_set)) if knn_enabled(t) else 0
        self.fd_samples = min(t.proxy_samples, len(train_set))
        # The kNN memory and the FD's real side are prefixes of one random order: each a random draw.
        train_images, train_labels = _images(train_set, order[:max(n_memory, self.fd_samples)])
        self.memory = self.queries = None
        if n_memory:
            test_set = create_dataset(data, "test", train_transform=False)
            picked = np.random.default_rng(PROXY_SEED).permutation(len(test_set))[:t.proxy_knn_test]
            test_images, test_labels = _images(test_set, picked)
            self.memory = (self._tokens(train_images[:n_memory]), train_labels[:n_memory])
            self.queries = (self._tokens(test_images), test_labels)
        self.extract = self.real = None
        if self.fd_samples >= 2:
            self._setup_fd(train_images[:self.fd_samples])
            gen, tokens = self.config.generate, self.config.model.num_tokens
            self.noise = decoding_noise(self.config.seed, range(self.fd_samples), gen.steps, tokens)  # [2, K, T, L]
        self.ready = True

    def _setup_fd(self, real_images: torch.Tensor) -> None:
        """The extractor and the real side's features, or one warning line when the extractor's weights
        are not on this machine (the FD proxy is then left out)."""
        from mage_bench.errors import UserError
        from mage_bench.eval.generation import default_extractor

        self.extractor_name = default_extractor(self.config.data.name)
        try:
            weights = _local_weights(self.extractor_name)
        except UserError as exc:
            print(f"mage-bench: warning: the FD proxy is skipped ({self.extractor_name}): {exc}", file=sys.stderr)
            return
        from mage_bench.io import sha256_file

        self.weights_sha256 = sha256_file(weights)[:16]
        self.extract = _extractor(self.extractor_name, weights, self.device)
        self.real = self._features(real_images)

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        """long [N, L] on the device, fp32 as the evaluation's features (`probe_features`)."""
        import torch

        return torch.cat([self.tokenizer.encode(images[i:i + self.batch].to(self.device)).flatten(1)
                          for i in range(0, len(images), self.batch)])

    def _features(self, images: torch.Tensor) -> np.ndarray:
        """The extractor's features of [0, 1] images, quantised to 8 bits as the run's PNGs are."""
        import torch

        from mage_bench.samples import to_uint8

        png = self.config.generate.png
        return torch.cat([self.extract(to_uint8(images[i:i + self.batch].to(self.device), png)).float().cpu()
                          for i in range(0, len(images), self.batch)]).numpy()

    # ----------------------------------------------------------------------------------------
    # The proxies

    def _probe(self, tokens: torch.Tensor) -> np.ndarray:
        import torch

        return torch.cat([self.model.features(tokens[i:i + self.batch]).float().cpu()
                          for i in range(0, len(tokens), self.batch)]).numpy()

    def _knn(self) -> dict[str, Any]:
        from mage_bench.errors import UserError
        from mage_bench.eval.knn import knn_classify

        if self.memory is None:
            return {}
        (memory, memory_y), (queries, query_y) = self.memory, self.queries
        sizes = {KNN_TRAIN_KEY: len(memory_y), KNN_TEST_KEY: len(query_y)}
        try:
            top1 = knn_classify(self._probe(memory), memory_y, self._probe(queries), query_y, k=KNN_K,
                                temperature=KNN_TEMPERATURE)["top1"]
        except UserError as exc:  # non-finite features: the line says null, training goes on
            print(f"mage-bench: warning: no kNN proxy at this step: {exc}", file=sys.stderr)
            top1 = None
        return {KNN_KEY: top1, **sizes}

    def _fd(self) -> dict[str, Any]:
        from mage_bench.errors import UserError
        from mage_bench.eval.fid import frechet_distance
        from mage_bench.mage.generate import iterative_decode

        if self.extract is None:
            return {}
        gen, side = self.config.generate, int(round(self.config.model.num_tokens ** 0.5))
        fake = []
        for lo in range(0, self.fd_samples, self.batch):
            tokens = iterative_decode(self.model, self.noise[:, lo:lo + self.batch], gen.steps, gen.temperature)
            fake.append(self._features(self.tokenizer.decode(tokens.view(-1, side, side))))
        try:
            fd = frechet_distance(np.concatenate(fake), self.real)
        except UserError as exc:
            print(f"mage-bench: warning: no FD proxy at this step: {exc}", file=sys.stderr)
            fd = None
        return {FD_KEY: fd, FD_SAMPLES_KEY: self.fd_samples, FD_EXTRACTOR_KEY: self.extractor_name,
                FD_WEIGHTS_KEY: self.weights_sha256}
