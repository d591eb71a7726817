"""Tokenizer throughput (pytest-benchmark; skipped in the normal test run, see `tox -e bench`)."""

import pytest
import torch

from mage_bench.tokenizer import create_tokenizer


@pytest.fixture(scope="module")
def digits_tokenizer():
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    return create_tokenizer("vq_digits")


def test_bench_train_step_vq_digits(benchmark, digits_tokenizer):
    model = digits_tokenizer.train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    images = torch.rand(64, 3, 16, 16)

    def step():
        recon, vq_loss, _, _ = model(images)
        loss = (recon - images).abs().mean() + (recon - images).pow(2).mean() + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    benchmark(step)
    benchmark.extra_info["images_per_step"] = 64


def test_bench_encode_vq_digits(benchmark, digits_tokenizer):
    model = digits_tokenizer.eval()
    images = torch.rand(512, 3, 16, 16)
    benchmark(model.encode, images)
    benchmark.extra_info["images_per_call"] = 512
