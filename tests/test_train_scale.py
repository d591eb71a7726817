"""The training path at scale, shown small on the CPU (issue 16): masks drawn per process, random states
of every device, precision of the logits and similarities, host syncs, data loading."""

from __future__ import annotations

import pytest
import torch

from mage_bench.mage import masking


def test_a_rows_masks_do_not_depend_on_the_process_count():
    """Two processes drawing their halves give the masks one process draws for the whole batch."""
    ratios = torch.rand(16, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.5
    whole = masking.rank_token_masks(ratios, 64, 0.5, seed=3, step=7, view=0, first_row=0)
    halves = [masking.rank_token_masks(ratios[r * 8:(r + 1) * 8], 64, 0.5, seed=3, step=7, view=0, first_row=r * 8)
              for r in range(2)]
    for i in range(2):  # mask, drop
        assert torch.equal(whole[i], torch.cat([h[i] for h in halves]))
    # Another step, view or seed gives another order; the counts follow the ratios, drop within mask.
    mask, drop = whole
    for other in ({"step": 8}, {"view": 1}, {"seed": 4}):
        kwargs = {"seed": 3, "step": 7, "view": 0, **other}
        assert not torch.equal(masking.rank_token_masks(ratios, 64, 0.5, first_row=0, **kwargs)[1], drop)
    assert torch.equal(mask.sum(1), torch.ceil(ratios.double() * 64 - 1e-9).long().clamp(min=32))
    assert (drop.sum(1) == 32).all() and not (drop & ~mask).any()


def test_hashed_orders_are_uniform_and_the_same_as_the_double_argsort_would_give():
    """Every position is dropped about half the time over many rows (no position favoured), and the
    one-argsort construction equals the ranks of a double argsort of the same keys."""
    rows = torch.arange(4096)
    keys = masking.hashed_keys(0, 11, 0, rows, 256)
    assert all(len(set(row.tolist())) == 256 for row in keys[:64])  # distinct within a row: no ties
    n_mask = torch.full((4096,), 160)
    mask, drop = masking.masks_from_keys(keys, n_mask, 128)
    rank = keys.argsort(dim=1).argsort(dim=1)
    assert torch.equal(mask, rank < 160) and torch.equal(drop, rank < 128)
    frequency = drop.double().mean(0)  # per position, over 4,096 rows: 0.5 +- 0.008 (1 sd)
    assert (frequency - 0.5).abs().max() < 0.05


def test_the_trainers_masks_are_drawn_for_its_own_rows_on_its_device(tiny_run_layer):
    from mage_bench.config import RunConfig, resolve_config
    from mage_bench.train import Runtime, Trainer, resolve_run_config, setup_runtime

    config = resolve_run_config(resolve_config(RunConfig, tiny_run_layer))
    trainer = Trainer(config, setup_runtime(config))
    ratios = torch.rand(32, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.5  # a global batch of 2 x 16

    def masks(rank: int, world: int, batch: int):
        trainer.runtime = trainer.stream.runtime = Runtime(rank, world, torch.device("cpu"), None)
        trainer.stream.batch = batch
        return trainer._masks(ratios, 64, step=5, view=0)

    halves = [masks(rank, 2, 16) for rank in range(2)]  # what each of two processes draws: its 16 rows
    whole = masks(0, 1, 32)  # one process holding both halves
    assert halves[0][0].shape == (16, 64)
    assert torch.equal(torch.cat([h[0] for h in halves]), whole[0])
    assert torch.equal(torch.cat([h[1] for h in halves]), whole[1])


def test_every_devices_random_state_is_saved_and_restored(monkeypatch):
    """On a GPU the dropout draws come from the device's generator: the checkpoint holds it per process."""
    from mage_bench.training import rng_state, set_rng_state

    saved, restored = torch.tensor([1, 2, 3], dtype=torch.uint8), {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: saved)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: restored.update(state=state))
    state = rng_state(torch.device("cuda", 0))
    assert set(state) == {"cpu", "cuda"} and torch.equal(state["cuda"], saved)
    set_rng_state(state, torch.device("cuda", 0))
    assert torch.equal(restored["state"], saved)
    assert set(rng_state(torch.device("cpu"))) == {"cpu"}
    # Checkpoints from before device states were saved hold the CPU state alone.
    before = torch.get_rng_state()
    torch.rand(3)
    set_rng_state(before, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)


def test_a_checkpoint_holds_each_processes_states(tmp_path, tiny_run_layer):
    from mage_bench.config import RunConfig, resolve_config
    from mage_bench.io import safe_torch_load
    from mage_bench.train import train

    train(resolve_config(RunConfig, tiny_run_layer), tmp_path / "run", progress=False)
    state = safe_torch_load(tmp_path / "run" / "checkpoint.pt")
    assert isinstance(state["torch_rng"], list) and set(state["torch_rng"][0]) == {"cpu"}


def test_logits_and_contrastive_similarities_stay_fp32_under_autocast():
    """Under bf16 autocast the vocabulary logits and InfoNCE's similarities are computed in fp32 from the
    same inputs (a `.float()` alone would not survive autocast's matmul)."""
    from mage_bench.mage.contrastive import info_nce
    from mage_bench.mage.model import MlmLayer

    torch.manual_seed(0)
    layer = MlmLayer(16, 16, 40)
    x, words = torch.randn(2, 5, 16), torch.randn(40, 16)
    hidden = layer.ln(torch.nn.functional.gelu(layer.fc(x)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x, words)
        z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
        loss = info_nce(z1, z2, 0.2)
        hidden_bf16 = layer.ln(torch.nn.functional.gelu(layer.fc(x)))
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, hidden_bf16.float() @ words.t() + layer.bias, atol=1e-5)
    assert loss.dtype == torch.float32 and torch.equal(loss, info_nce(z1, z2, 0.2))
    assert not torch.allclose(hidden_bf16.float() @ words.t(), hidden @ words.t(), atol=1e-6)  # bf16 is coarser


def test_auto_precision_picks_bf16_only_where_the_gpu_computes_it(monkeypatch):
    from mage_bench.train import bf16_native

    asked = {}

    def supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return including_emulation  # a V100/T4: emulated only

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert bf16_native() is False and asked == {"including_emulation": False}


def test_a_training_step_never_waits_for_the_device(tiny_run_layer):
    """forward + backward read no tensor value on the host (no `.item()`/`float()`/`bool()`, no shapes
    that depend on values, no `.tolist()`): on a GPU each one would stall the step."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "benchmarks"))
    from train_step import HostSyncCounter

    from mage_bench.config import RunConfig, resolve_config
    from mage_bench.train import Trainer, WindowedSteps, resolve_run_config, setup_runtime

    layer = {**tiny_run_layer, "contrastive": {"weight": 0.1}}
    config = resolve_run_config(resolve_config(RunConfig, layer))
    trainer = Trainer(config, setup_runtime(config))
    steps = WindowedSteps(trainer)
    steps.train_step(0)
    with HostSyncCounter() as counter:
        steps.train_step(1)
    assert counter.count == 0  # AdamW's reads of its CPU step counters are counted apart: no device there
    with HostSyncCounter() as counter:  # a record reads the window: the losses, the mean mask ratio
        steps.log_record(2, 0.0)
    assert counter.count == 2


def test_tokenizer_training_takes_a_device(tmp_path, tiny_job_layer):
    from mage_bench.config import TokenizerJobConfig, resolve_config
    from mage_bench.errors import UserError
    from mage_bench.tokenizer.train import train_tokenizer

    config = resolve_config(TokenizerJobConfig, tiny_job_layer)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            train_tokenizer(config, tmp_path / "gpu", progress=False, device="cuda")
        assert not (tmp_path / "gpu" / "train_state.pt").exists()
    card = train_tokenizer(config, tmp_path / "cpu", progress=False, device="cpu", stop_at=4)
    assert card == {"interrupted_at": 4}


def _image_folder(root, names=("a", "b"), per_class=3, bad=None):
    from PIL import Image

    for split in ("train", "val"):
        for label, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (16, 16), (40 * i, 100 * label, 7)).save(folder / f"{i}.png")
    if bad:
        (root / "train" / names[0] / bad).write_bytes(b"not a png")
    return root


def test_a_corrupt_image_in_a_worker_names_the_file(tmp_path):
    from mage_bench.config import DataConfig
    from mage_bench.data import create_dataset
    from mage_bench.errors import DataError

    root = _image_folder(tmp_path / "data", bad="broken.png")
    dataset = create_dataset(DataConfig(name=f"imagefolder:{root}", image_size=16), "train")
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=1)
    with pytest.raises(DataError) as caught:
        list(loader)
    first_line = str(caught.value).splitlines()[0]
    assert first_line.startswith("cannot read image ") and "broken.png" in first_line
    assert first_line.endswith("(in DataLoader worker process 0)")


def test_folder_data_keeps_one_loader_and_decodes_each_image_once_for_two_views(tmp_path, monkeypatch):
    from torch.utils.data import DistributedSampler

    from mage_bench.config import DataConfig
    from mage_bench.data import ImageFolderDataset, create_dataset
    from mage_bench.train import EpochSampler, MultiView

    root = _image_folder(tmp_path / "data", per_class=4)
    dataset = create_dataset(DataConfig(name=f"imagefolder:{root}", image_size=16), "train")
    loads = []
    original = ImageFolderDataset.load
    monkeypatch.setattr(ImageFolderDataset, "load", lambda self, i: loads.append(i) or original(self, i))
    first, second = MultiView(dataset, 2)[3]
    assert loads == [3] and first.shape == second.shape == (3, 16, 16)

    sampler = EpochSampler(dataset, world=2, rank=1, seed=5, batch=2, batches=2)
    reference = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=5, drop_last=True)
    for epoch, position in ((0, 0), (1, 1), (3, 0)):
        sampler.start(epoch, position)
        reference.set_epoch(epoch)
        assert list(sampler) == list(reference)[position * 2:4] and len(sampler) == (2 - position) * 2
