"""More than one process: torchrun + DDP on CPU (gloo), and a DeepSpeed config on GPUs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import gpu_test
from ocrmem import MEMModel

REPO = Path(__file__).resolve().parents[2]
WORLD_SIZE = 2
STEPS = 4


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)


def run_torchrun(out: Path, nproc: int, *extra: str, timeout: float = 240,
                 env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` (a free port) running ``ocrmem.train``; never outlives ``timeout``.

    torchrun starts every rank in a session of its own, so killing torchrun's process group
    leaves the ranks running (and holding any pipe open). So: output goes to files, not pipes;
    the ranks' pids are collected while torchrun runs (they are its children until it exits);
    on timeout — and after a normal exit, for any rank left behind — every collected process is
    killed. Every wait is bounded.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"  # two ranks on a 2-core machine
    env.update(env_extra or {})
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "-m", "ocrmem.train", "--output-dir", str(out), "--logging-steps", "1", "--save-rank-weights",
        "--ddp-timeout", "120", *extra,
    ]
    logs = out.parent / f"{out.name}.torchrun"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout", "w+") as stdout, open(logs / "stderr", "w+") as stderr:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr, text=True, start_new_session=True)
        seen: dict[int, psutil.Process] = {}
        deadline = time.monotonic() + timeout
        timed_out = False
        while proc.poll() is None:
            seen.update((p.pid, p) for p in _descendants(proc.pid))
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.5)
        leftover = [p for p in seen.values() if p.is_running()]
        if timed_out:
            _kill([psutil.Process(proc.pid), *leftover] if proc.poll() is None else leftover)
            proc.wait(timeout=30)
        elif leftover:
            _kill(leftover)
        stdout.seek(0), stderr.seek(0)
        out_text, err_text = stdout.read(), stderr.read()
    if timed_out:
        pytest.fail(f"torchrun did not finish in {timeout} s (all its processes killed):\n{err_text[-4000:]}")
    assert not leftover, f"ranks still running after torchrun exited: {[p.pid for p in leftover]}"
    return subprocess.CompletedProcess(command, proc.returncode, out_text, err_text)


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
    # proj_grad_norm is read from the all-reduced gradients HF's grad_norm sees (proj is all that
    # trains), not from rank 0's own — which is exactly 0 on a step where rank 0 had no memory.
    logged = [h for h in json.loads((tmp_path / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(logged) == STEPS
    for row in logged:
        assert row["proj_grad_norm"] == pytest.approx(row["grad_norm"], rel=1e-5, abs=1e-8), row
    assert any(row["grad_norm"] > 0 for i, row in enumerate(logged) if not stats[0]["memory_used"][i])


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
