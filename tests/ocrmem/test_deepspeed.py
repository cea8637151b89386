"""DeepSpeed (ZeRO-2, ZeRO-3) on CPU, and what makes the first-batch diagnosis safe under engines.

Fast tests (default run): the ``autograd_grad`` diagnosis writes no ``.grad`` and fires no
post-accumulate hook (what DDP and DeepSpeed ZeRO reduce from) yet finds what a real backward
finds, on MEMModel and a stock transformers model; the zero-weighted memory pass of a batch
without history runs ``proj`` (and, on sharded engines, the encoder and the LLM's backward);
the launcher check; an ``optimizer`` block in the DeepSpeed config.

Slow tests (``-m slow``): torchrun, 2 CPU ranks (gloo), half the rows without history, against
the same run under DDP.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from diagnostics import diagnose
from ocrmem import MEMModel
from ocrmem.data import build_sample_batch
from ocrmem.train import main
from ocrmem.training import check_optimizer_params

from .test_distributed import run_torchrun

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs deepspeed (DS_BUILD_OPS=0 pip install deepspeed)")
PROJ_KEYS = {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias"}


# ---------------------------------------------------------------------- the diagnosis


def _hook_all_trainable(model: torch.nn.Module) -> tuple[list[str], list]:
    fired: list[str] = []
    handles = [
        p.register_post_accumulate_grad_hook(lambda _p, n=n: fired.append(n))
        for n, p in model.named_parameters() if p.requires_grad
    ]
    return fired, handles


def _tiny_llama_adapter_only() -> LlamaForCausalLM:
    """A stock transformers LM trained adapter-only: only ``lm_head`` learns."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    return model


def _llama_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone()}


def _family(name: str, tiny_dir: Path, broken: bool) -> tuple[torch.nn.Module, dict, list[str]]:
    """(model, batch, expect_trainable); ``broken``: the adapter's weights are NaN (a real bug a
    gradient-value check must see: the loss and every gradient are NaN)."""
    if name == "memmodel":
        model = MEMModel.from_pretrained(tiny_dir)
        batch, prefixes, adapter = build_sample_batch(model, batch_size=2, seed=0), ["proj"], model.proj[0].weight
    else:
        model, batch, prefixes = _tiny_llama_adapter_only(), _llama_batch(), ["lm_head"]
        adapter = model.lm_head.weight
    if broken:
        with torch.no_grad():
            adapter.fill_(float("nan"))
    return model, batch, prefixes


@pytest.mark.parametrize("family", ["memmodel", "llama"])
@pytest.mark.parametrize("broken", [False, True], ids=["healthy", "nan_adapter"])
def test_autograd_grad_diagnosis_fires_no_engine_hook_and_finds_what_backward_finds(tiny_dir, family, broken):
    model, batch, prefixes = _family(family, tiny_dir, broken)
    fired, handles = _hook_all_trainable(model)
    try:
        safe = diagnose(model, batch, expect_trainable=prefixes, backward="autograd_grad", lint=False)
        assert fired == [], "autograd_grad ran AccumulateGrad: DDP/ZeRO would reduce this gradient"
        assert all(p.grad is None for p in model.parameters())
        real = diagnose(model, batch, expect_trainable=prefixes, backward=True, lint=False)
        assert fired, "the control: a real backward does fire the hooks ZeRO-2 reduces from"
    finally:
        for handle in handles:
            handle.remove()
    assert safe.status == real.status == ("error" if broken else "ok")
    assert sorted(f.cause for f in safe.findings) == sorted(f.cause for f in real.findings)


def test_graph_only_diagnosis_still_names_the_broken_adapter(tiny_dir):
    from tests.regression.test_seed_problem_1_no_grad import ProjInsideNoGrad

    broken = ProjInsideNoGrad.from_pretrained(tiny_dir)
    report = diagnose(broken, build_sample_batch(broken, batch_size=2, seed=0), expect_trainable=["proj"],
                      backward="none", lint=False)
    assert report.status == "error" and any(f.cause == "grad_disabled" for f in report.findings)
    healthy = MEMModel.from_pretrained(tiny_dir)
    report = diagnose(healthy, build_sample_batch(healthy, batch_size=2, seed=0), expect_trainable=["proj"],
                      backward="none", lint=False)
    assert report.status == "ok", report.findings


def test_diagnose_rejects_an_unknown_backward_mode(tiny_model, tiny_batch):
    with pytest.raises(ValueError, match="autograd_grad"):
        diagnose(tiny_model, tiny_batch, backward="twice")


# ---------------------------------------------------------------------- a batch without history


def _no_history_batch(model: MEMModel) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids.clone()}  # far below context_threshold: no pages


def _called(module: torch.nn.Module, log: list[str], name: str):
    return module.register_forward_hook(lambda *_: log.append(name))


def test_batch_without_history_runs_proj_with_an_exactly_zero_gradient(tiny_model):
    calls: list[str] = []
    handles = [_called(tiny_model.proj, calls, "proj"), _called(tiny_model.ocr_embed, calls, "encoder")]
    with pytest.warns(UserWarning, match="proj took no part"):
        out = tiny_model(**_no_history_batch(tiny_model))
    for handle in handles:
        handle.remove()
    assert calls == ["proj"]  # a real pass through proj; the frozen encoder is not worth running
    assert not out.memory_used
    out.loss.backward()
    for p in tiny_model.proj.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


def test_on_sharded_parameters_the_empty_batch_runs_what_a_memory_batch_runs(tiny_model):
    # DeepSpeed ZeRO-3 marks every parameter it partitions with `ds_id`: what the model looks at.
    for p in [*tiny_model.proj.parameters(), *tiny_model.ocr_embed.parameters()]:
        p.ds_id = 0
    calls: list[str] = []
    layers = tiny_model.base_llm.model.layers
    handles = [
        _called(tiny_model.proj, calls, "proj"),
        _called(tiny_model.ocr_embed, calls, "encoder"),
        layers[0].register_full_backward_hook(lambda *_: calls.append("llm backward")),
    ]
    try:
        with pytest.warns(UserWarning, match="proj took no part"):
            out = tiny_model(**_no_history_batch(tiny_model))
        out.loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    # encoder, proj, then the LLM — and backward through the LLM's layers down to proj, as with memory
    assert calls == ["encoder", "proj", "llm backward"]
    for p in tiny_model.proj.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))


# ---------------------------------------------------------------------- the command line


def _ds_config(path: Path, stage: int, **extra) -> Path:
    config = {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto", "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage}, "zero_force_ds_cpu_optimizer": False, **extra,
    }
    path.write_text(json.dumps(config))
    return path


@needs_deepspeed
def test_deepspeed_without_a_launcher_says_what_to_run(tmp_path, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    code = main(["--output-dir", str(tmp_path / "out"), "--deepspeed", str(_ds_config(tmp_path / "ds.json", 2))])
    err = capsys.readouterr().err
    assert code == 2
    assert "torchrun --nproc_per_node N -m ocrmem.train" in err and "deepspeed --num_gpus N" in err
    assert len(err.strip().splitlines()) == 1 and "mpi4py" not in err
    assert not (tmp_path / "out" / "model_init").exists()  # refused before any work


def test_shipped_zero2_config_is_the_users_setup():
    config = json.loads((Path(__file__).resolve().parents[2] / "examples" / "ds_zero2_bf16.json").read_text())
    assert config["zero_optimization"]["stage"] == 2
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 8
    assert config["bf16"]["enabled"] == "auto" and config["train_batch_size"] == "auto"
    assert "optimizer" not in config and config["zero_force_ds_cpu_optimizer"] is False


def test_optimizer_check_accepts_deepspeeds_placeholder_optimizer(tiny_model):
    # A DeepSpeed config with an `optimizer` block: accelerate hands the Trainer a DummyOptim that
    # holds `params` and no `param_groups`; DeepSpeed builds the real optimizer later.
    accelerate_ds = pytest.importorskip("accelerate.utils.deepspeed")
    trainable = [p for p in tiny_model.parameters() if p.requires_grad]
    check_optimizer_params(tiny_model, accelerate_ds.DummyOptim(params=trainable))
    check_optimizer_params(tiny_model, accelerate_ds.DummyOptim(params=[{"params": trainable, "weight_decay": 0.0}]))
    with pytest.raises(RuntimeError, match="frozen"):
        check_optimizer_params(tiny_model, accelerate_ds.DummyOptim(params=list(tiny_model.parameters())))


# ---------------------------------------------------------------------- 2 ranks, slow

RUN = ("--max-steps", "4", "--batch-size", "1", "--num-examples", "32", "--empty-history-fraction", "0.5", "--save-steps", "2")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "out"
    done = run_torchrun(out, 2, *RUN)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def _check_engine_run(out: Path, ddp: Path) -> None:
    stats = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    mixed = [i for i in range(4) if stats[0]["memory_used"][i] != stats[1]["memory_used"][i]]
    assert mixed, [s["memory_used"] for s in stats]  # one rank with memory, the other without
    replicas = [load_file(str(out / f"rank{r}.safetensors")) for r in range(2)]
    final = load_file(str(out / "model.safetensors"))
    assert set(final) == PROJ_KEYS
    for name in PROJ_KEYS:
        assert torch.equal(replicas[0][name], replicas[1][name]), name
        assert torch.equal(final[name], replicas[0][name]), name
    start = MEMModel.from_pretrained(out / "model_init").trainable_state_dict()  # proj as training began
    ref = load_file(str(ddp / "model.safetensors"))
    for name in PROJ_KEYS:
        assert not torch.equal(final[name], start[name]), f"{name} did not move"
        assert torch.allclose(final[name], ref[name], rtol=0, atol=1e-6), (name, (final[name] - ref[name]).abs().max())
    MEMModel.from_pretrained(out)  # the adapter dir loads as is


def _resume_is_bit_identical(out: Path, tmp_path: Path, config: Path) -> None:
    again = tmp_path / "resumed"
    shutil.copytree(out, again, ignore=shutil.ignore_patterns("checkpoint-4"))  # as if killed after step 3
    for stale in [again / "model.safetensors", *again.glob("rank*")]:
        stale.unlink()
    done = run_torchrun(again, 2, *RUN, "--deepspeed", str(config), "--resume-from-checkpoint", "last", timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    first, second = load_file(str(out / "model.safetensors")), load_file(str(again / "model.safetensors"))
    for name in PROJ_KEYS:
        assert torch.equal(first[name], second[name]), name


def _describe_checkpoint(path: Path) -> str:
    return ", ".join(f"{p.relative_to(path)} ({p.stat().st_size:,} B)" for p in sorted(path.rglob("*")) if p.is_file())


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_torchrun_two_cpu_ranks_deepspeed_equals_ddp_and_resumes_bit_exactly(tmp_path, ddp_run, stage, capsys):
    config = _ds_config(tmp_path / "ds.json", stage)
    out = tmp_path / "out"
    done = run_torchrun(out, 2, *RUN, "--deepspeed", str(config), timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "first batch: gradient flow into ['proj'] is healthy" in done.stderr  # the diagnosis ran, harmlessly
    assert "deepspeed_shm_comm" not in done.stdout + done.stderr  # no JIT build of DeepSpeed's CPU comm op
    _check_engine_run(out, ddp_run)
    # The per-step gradient checks ran under DeepSpeed too, on each rank's own micro-batch: a
    # non-zero gradient exactly where that rank's batch had memory (the zero-weighted pass of a
    # rank without memory gives proj an exactly zero one).
    for rank in range(2):
        stats = json.loads((out / f"rank{rank}.json").read_text())
        norms = stats["checked_grad_norms"]
        assert [step for step, _ in norms] == [1, 2, 3, 4], norms
        assert [norm > 0 for _, norm in norms] == stats["memory_used"], (rank, norms, stats["memory_used"])
    global_step = out / "checkpoint-2" / "global_step2"
    assert global_step.is_dir() and (out / "checkpoint-2" / "model.safetensors").is_file()
    with capsys.disabled():
        print(f"\nZeRO-{stage} checkpoint-2: {_describe_checkpoint(out / 'checkpoint-2')}")
    _resume_is_bit_identical(out, tmp_path, config)


@pytest.mark.slow
@needs_deepspeed
def test_the_users_bf16_zero2_config_trains_and_saves_the_fp32_masters(tmp_path):
    """The shipped ``examples/ds_zero2_bf16.json`` as the user runs it (--bf16, per-device batch 2,
    accumulation 8), 2 CPU ranks. The model holds bf16 copies; the adapter file must hold the
    optimizer's fp32 masters (what DeepSpeed's own zero_to_fp32 recovers), not their rounding."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    config = Path(__file__).resolve().parents[2] / "examples" / "ds_zero2_bf16.json"
    out = tmp_path / "out"
    done = run_torchrun(out, 2, "--max-steps", "2", "--batch-size", "2", "--grad-accum", "8", "--bf16",
                        "--num-examples", "32", "--empty-history-fraction", "0.5", "--save-steps", "2",
                        "--deepspeed", str(config), timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "first batch: gradient flow into ['proj'] is healthy" in done.stderr
    masters = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoint-2"))
    for path in (out / "checkpoint-2" / "model.safetensors", out / "model.safetensors"):
        saved = load_file(str(path))
        assert set(saved) == PROJ_KEYS
        for name, value in saved.items():
            assert value.dtype == torch.float32, (path, name)
            assert torch.equal(value, masters[name].float()), (path, name)
        # fp32 precision kept: the weights are not all bf16-representable
        assert any(not torch.equal(v, v.bfloat16().float()) for v in saved.values())
    for rank in range(2):  # the per-step checks ran, over the 8 micro-batches of each step
        stats = json.loads((out / f"rank{rank}.json").read_text())
        assert [s for s, _ in stats["checked_grad_norms"]] == [1, 2] and stats["micro_batches"] == 16
        assert all(norm > 0 and norm == norm for _, norm in stats["checked_grad_norms"]), stats["checked_grad_norms"]
