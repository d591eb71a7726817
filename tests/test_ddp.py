"""DDP: 2 gloo processes with batch B must match 1 process with batch 2B (one ratio per global batch);
under the default per-process ratios (official), each rank draws its own.

Tolerance: gradients agree to 1e-6 absolute + 1e-4 relative (DDP sums per-process gradients in
another order than one process does); losses of the first step to 1e-6 relative, and of the second
step (after an AdamW update, which normalises tiny gradient differences) to 1e-4.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from mage_bench.config import RunConfig, resolve_config
from mage_bench.train import Trainer, resolve_run_config, setup_runtime

config = resolve_run_config(resolve_config(RunConfig, json.loads(sys.argv[1])))
runtime = setup_runtime(config)
trainer = Trainer(config, runtime)
losses, ratios = [], []
for step in range(2):
    values, step_ratios = trainer.forward_backward(step)
    losses.append(trainer.global_mean(values["loss"].detach().double()[None], 1)[0])
    ratios.append(trainer.stream.rank_slice(step_ratios))  # this rank's rows
    if step == 0:
        grads = {n: p.grad.clone() for n, p in trainer.objective.named_parameters() if p.grad is not None}
    trainer.optimizer_step(step)
torch.save({"ratios": ratios}, sys.argv[2] + f".rank{runtime.rank}")
if runtime.rank == 0:
    torch.save({"losses": losses, "grads": grads, "world": runtime.world}, sys.argv[2])
if dist.is_initialized():
    dist.destroy_process_group()
"""


def _run(tmp_path, layer, batch, nproc, tag=""):
    script = tmp_path / "step.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"result-{nproc}{tag}.pt"
    layer = {**layer, "train": {**layer["train"], "batch_size": batch}}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    subprocess.run(launcher + [str(script), json.dumps(layer), str(out)], check=True, env=env, timeout=300)
    result = torch.load(out, weights_only=True)
    result["rank_ratios"] = [torch.load(f"{out}.rank{r}", weights_only=True)["ratios"] for r in range(nproc)]
    return result


@pytest.mark.parametrize("extra", [{}, {"contrastive": {"weight": 0.5}}], ids=["mage", "mage-c"])
def test_two_processes_match_one_with_twice_the_batch(tmp_path, tiny_run_layer, extra):
    layer = {**tiny_run_layer, **extra, "train": {**tiny_run_layer["train"], "warmup_steps": 0},
             "masking": {"per": "batch"}}  # one ratio for the global batch, as one process draws it
    two = _run(tmp_path, layer, batch=8, nproc=2)
    one = _run(tmp_path, layer, batch=16, nproc=1)
    assert two["world"] == 2 and one["world"] == 1
    assert two["grads"].keys() == one["grads"].keys()
    for name, grad in one["grads"].items():
        assert torch.allclose(two["grads"][name], grad, atol=1e-6, rtol=1e-4), name
    assert two["losses"][0] == pytest.approx(one["losses"][0], rel=1e-6)
    assert two["losses"][1] == pytest.approx(one["losses"][1], rel=1e-4)


def test_each_process_draws_its_own_ratio(tmp_path, tiny_run_layer):
    """Official semantics (masking.per: process, the default): ranks draw different ratios, each shared
    by the rank's rows; the same seed repeats them; one process draws exactly as per: batch does."""
    layer = {**tiny_run_layer, "train": {**tiny_run_layer["train"], "warmup_steps": 0}}
    two = _run(tmp_path, layer, batch=8, nproc=2)
    rank0, rank1 = two["rank_ratios"]
    for step in range(2):
        assert (rank0[step] == rank0[step][0]).all() and (rank1[step] == rank1[step][0]).all()
        assert rank0[step][0] != rank1[step][0]
    again = _run(tmp_path, layer, batch=8, nproc=2, tag="-again")
    assert again["losses"] == two["losses"]
    assert all(torch.equal(a, b) for a, b in zip(again["rank_ratios"][1], rank1, strict=True))
    single = _run(tmp_path, layer, batch=16, nproc=1, tag="-process")
    batch = _run(tmp_path, {**layer, "masking": {"per": "batch"}}, batch=16, nproc=1, tag="-batch")
    assert single["losses"] == batch["losses"]
    assert all(torch.equal(single["grads"][k], batch["grads"][k]) for k in single["grads"])
