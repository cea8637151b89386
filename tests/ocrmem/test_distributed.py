"""More than one process: torchrun + DDP on CPU (gloo), and a DeepSpeed config on GPUs."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import gpu_test
from ocrmem import MEMModel

REPO = Path(__file__).resolve().parents[2]
WORLD_SIZE = 2
STEPS = 4


def run_torchrun(out: Path, nproc: int, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` (a free port) in its own process group, killed whole on timeout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"  # two ranks on a 2-core machine
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "-m", "ocrmem.train", "--output-dir", str(out), "--logging-steps", "1", "--save-rank-weights", *extra,
    ]
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # A hang (one rank waiting in an all-reduce the other never joins): kill torchrun and its ranks.
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


@pytest.mark.slow  # torchrun with two CPU ranks, ~35 s on 2 cores
def test_torchrun_two_cpu_ranks_train_through_batches_without_history(tmp_path):
    done = run_torchrun(
        tmp_path, WORLD_SIZE, "--max-steps", str(STEPS), "--batch-size", "1", "--num-examples", "32",
        "--empty-history-fraction", "0.5", "--save-steps", "2",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "unused parameters" not in done.stderr and "find_unused_parameters" not in done.stderr

    stats = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert all(s["world_size"] == WORLD_SIZE and s["micro_batches"] == STEPS for s in stats)
    # Some step had memory on one rank and none on the other: the case that breaks naive DDP.
    mixed = [i for i in range(STEPS) if stats[0]["memory_used"][i] != stats[1]["memory_used"][i]]
    assert mixed, [s["memory_used"] for s in stats]

    replicas = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD_SIZE)]
    assert set(replicas[0]) == {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias"}
    for name, value in replicas[0].items():
        assert torch.equal(value, replicas[1][name]), name
    final = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(final[name], value) for name, value in replicas[0].items())
    assert (tmp_path / "checkpoint-4" / "rng_state_1.pth").is_file()  # every rank's part, published together


@gpu_test()
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (pip install deepspeed)")
def test_deepspeed_zero2_config_is_passed_through(tmp_path):
    config = {
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
    }
    (tmp_path / "ds.json").write_text(json.dumps(config))
    done = run_torchrun(
        tmp_path / "out", 1, "--max-steps", "2", "--save-steps", "2", "--num-examples", "8",
        "--deepspeed", str(tmp_path / "ds.json"), timeout=580,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    MEMModel.from_pretrained(tmp_path / "out")
