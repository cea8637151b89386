"""Training-step throughput, peak memory and MFU at seed scale on one GPU — and the same code at
tiny scale on CPU (the smoke mode), so the GPU path is known to run before a GPU is lent.

Model: :func:`ocrmem.presets.build_seed_scale_model` (Qwen3-8B + full DeepEncoder + proj, built on
``meta``) given random bf16 weights on the GPU by :func:`ocrmem.presets.materialize_random`.
Smoke: the tiny preset's shapes built the same way on the CPU. Neither has a tokenizer: the
fast path only needs the memory token's id, which ``MEMConfig.memory_token_id`` carries.

A step is what the trainer does: forward on a fast-path batch (``B`` rows of ``P`` pages x 256
memory tokens + 2,048 recent tokens, labels on the recent tokens), backward, AdamW on ``proj``.

Configurations (:class:`StepConfig`):

* ``ours`` — frozen parts in ``eval()``, encoder untracked (``no_grad``), SDPA attention.
* ``ours+ckpt`` — the same with non-reentrant activation checkpointing of the LLM layers.
* ``user`` — what the user's code runs: encoder input forced to require grad
  (``x.detach().requires_grad_(True)`` → the whole encoder is tracked and back-propagated to the
  pixels), frozen modules kept in ``train()`` mode, eager attention, no checkpointing.

Useful FLOPs per step (:func:`useful_flops`), counted with ``torch.utils.flop_counter.FlopCounterMode``
on a ``meta`` twin of the model (no memory, exact shapes, a second or two):

* LLM forward + input-gradient backward (frozen weights need no weight gradients): the matmuls
  give exactly 4 · N_matmul per token (N_matmul = 6.95 B: every LLM weight but the input
  embedding, which is a lookup); attention score/value matmuls are counted by FlopCounterMode as
  full L x L products and **halved** here, because causal attention needs only the lower triangle.
* encoder forward, per page (1.14 TFLOP at 1024 px); its backward is not useful work.
* ``proj`` forward + weight-gradient backward (tiny).

Recomputation (checkpointing) and the user's encoder backward are *not* useful FLOPs, so MFU =
useful FLOPs / step time / peak. Peak dense bf16: 989 TFLOP/s for H100 SXM and H200
(``OCRMEM_PEAK_TFLOPS`` overrides; PCIe H100: 756).
"""

from __future__ import annotations

import copy
import gc
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

SMOKE = os.environ.get("OCRMEM_BENCH_SMOKE", "") not in ("", "0")
MEMORY_CAP_GIB = float(os.environ.get("OCRMEM_BENCH_MEMORY_GIB", "80"))  # "fits in 80 GB", also on an H200
SMOKE_MAX_BATCH = 2  # smoke mode pretends larger batches run out of memory, to exercise the step-down
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0}  # dense, no sparsity; first match wins


@dataclass(frozen=True)
class Scale:
    """Shapes and step counts of one run."""

    name: str
    recent_tokens: int  # text tokens after the memory tokens
    warmup_steps: int
    timed_steps: int


SEED_SCALE = Scale("seed-scale", recent_tokens=2048, warmup_steps=2, timed_steps=5)
TINY_SCALE = Scale("tiny (smoke)", recent_tokens=32, warmup_steps=1, timed_steps=2)


@dataclass(frozen=True)
class StepConfig:
    """How the model is run; see the module docstring."""

    name: str
    attn: str = "sdpa"
    checkpointing: bool = False
    encoder_input_grad: bool = False
    frozen_train_mode: bool = False


OURS = StepConfig("ours")
OURS_CKPT = StepConfig("ours+ckpt", checkpointing=True)
USER = StepConfig("user", attn="eager", encoder_input_grad=True, frozen_train_mode=True)
CONFIGS = {c.name: c for c in (OURS, OURS_CKPT, USER)}


def device_and_scale() -> tuple[torch.device, Scale]:
    if SMOKE:
        return torch.device("cpu"), TINY_SCALE
    return torch.device("cuda"), SEED_SCALE


def build_meta_model(smoke: bool) -> nn.Module:
    """The benchmark model on ``meta``: seed scale, or the tiny preset's shapes for smoke runs."""
    from ocrmem import compat
    from ocrmem.configuration import MEMConfig
    from ocrmem.encoder import DeepEncoder, DeepEncoderSpec
    from ocrmem.modeling import MEMModel
    from ocrmem.presets import build_seed_scale_model
    from ocrmem.tiny import SPECIAL_TOKENS, TINY_LLM, TINY_VOCAB

    if not smoke:
        return build_seed_scale_model(vision_embedding_size=1024, device="meta")  # memory id: Qwen's <|image_pad|>
    config_cls, model_cls = compat.tiny_llm_classes()
    with torch.device("meta"):
        llm = model_cls(config_cls(vocab_size=TINY_VOCAB + len(SPECIAL_TOKENS), **TINY_LLM))
        encoder = DeepEncoder(DeepEncoderSpec.tiny(), readout="tokens_plus_clip")
        config = MEMConfig(
            base_model_name="<tiny>",
            ocr_model_name="<tiny>",
            memory_token_id=TINY_VOCAB + SPECIAL_TOKENS.index("<|image_pad|>"),  # as the tiny tokenizer numbers it
        )
        return MEMModel(config, base_llm=llm, ocr_embed=encoder)


def build_model() -> nn.Module:
    """Materialise the benchmark model with random bf16 weights on the benchmark device."""
    from ocrmem.presets import materialize_random

    device, _ = device_and_scale()
    model = build_meta_model(SMOKE)
    materialize_random(model, dtype=torch.bfloat16, device=device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, MEMORY_CAP_GIB * 2**30 / total), device)
    return model.train()


def make_batch(model: nn.Module, batch_size: int, pages: int, recent_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fast-path batch: per row ``pages * T`` memory tokens then ``recent_tokens`` random tokens.

    Returns:
        ``input_ids``/``attention_mask``/``labels`` (B, pages*T + R) and ``pixel_values``
        (B*pages, 3, S, S) in the encoder's dtype, all on the model's device.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens_per_page, size = model.tokens_per_page, model.page_size
    memory = torch.full((batch_size, pages * tokens_per_page), model.memory_token_id, dtype=torch.long, device=device)
    high = min(1000, model.memory_token_id)
    recent = torch.randint(0, high, (batch_size, recent_tokens), generator=generator, device=device)
    input_ids = torch.cat([memory, recent], dim=1)  # (B, L)
    labels = torch.cat([torch.full_like(memory, -100), recent], dim=1)  # loss on the recent text only
    encoder_dtype = next(model.ocr_embed.parameters()).dtype
    pixel_values = torch.randn(  # (B*pages, 3, S, S): made on the device, 400 MB at batch 8 x 4 pages
        batch_size * pages, 3, size, size, generator=generator, device=device, dtype=encoder_dtype
    )
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": pixel_values,
    }


def _set_attn(llm: nn.Module, attn: str) -> None:
    if hasattr(llm, "set_attn_implementation"):
        llm.set_attn_implementation(attn)
    else:  # older transformers read the config field at each forward
        llm.config._attn_implementation = attn


@contextmanager
def configured(model: nn.Module, config: StepConfig) -> Iterator[nn.Module]:
    """Run ``model`` as ``config`` says, then put it back (ours, no checkpointing, train())."""
    from ocrmem import compat

    previous_attn = model.base_llm.config._attn_implementation
    try:
        _set_attn(model.base_llm, config.attn)
        if config.checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
        if config.frozen_train_mode:
            model.ocr_embed.train()
            model.base_llm.train()
        yield model
    finally:
        if compat.is_activation_checkpointing(model.base_llm):
            model.activation_checkpointing_disable()
        _set_attn(model.base_llm, previous_attn)
        model.train()


@lru_cache(maxsize=None)
def _meta_twin(part: str, module: nn.Module) -> nn.Module:
    """A ``meta`` copy of one part of the model, rebuilt from its config (no weights copied)."""
    from ocrmem.encoder import DeepEncoder

    with torch.device("meta"):
        if part == "llm":
            twin = type(module)(copy.deepcopy(module.config))
            _set_attn(twin, "sdpa")  # the attention implementation changes no useful FLOP
            return twin.requires_grad_(False)  # frozen, as in the model: no weight-gradient FLOPs
        if part == "encoder":
            return DeepEncoder(module.spec, readout=module.readout)
    return copy.deepcopy(module).to("meta")  # proj: a few MB at most


def _split_counts(counter: Any) -> tuple[float, float]:
    """(dense matmul FLOPs, attention FLOPs) from a FlopCounterMode's global counts."""
    dense = attention = 0.0
    for op, flops in counter.get_flop_counts()["Global"].items():
        if str(op).split(".")[-1] in ("mm", "addmm", "convolution", "_convolution"):
            dense += flops
        else:  # bmm and the fused SDPA kernels: attention scores and values (and rotary's tiny bmm)
            attention += flops
    return dense, attention


@lru_cache(maxsize=None)
def _llm_flops_per_sample(llm: nn.Module, seq_len: int) -> tuple[float, float]:
    """(dense, attention) FLOPs of one row's LLM forward + input-gradient backward, on ``meta``."""
    from torch.utils.flop_counter import FlopCounterMode

    twin = _meta_twin("llm", llm)
    hidden = llm.get_input_embeddings().embedding_dim
    dtype = next(twin.parameters()).dtype  # FLOPs do not depend on it; matching avoids dtype checks
    embeds = torch.empty(1, seq_len, hidden, device="meta", dtype=dtype, requires_grad=True)  # (1, L, H)
    positions = torch.arange(seq_len, device="meta")[None]
    labels = torch.zeros(seq_len, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        logits = twin(inputs_embeds=embeds, position_ids=positions).logits  # (1, L, V)
        nn.functional.cross_entropy(logits.float().view(seq_len, -1), labels).backward()
    return _split_counts(counter)


def useful_flops(model: nn.Module, batch_size: int, pages: int, seq_len: int) -> dict[str, float]:
    """Useful FLOPs of one step (see the module docstring), by part."""
    from torch.utils.flop_counter import FlopCounterMode

    dense, attention = _llm_flops_per_sample(model.base_llm, seq_len)
    encoder = _meta_twin("encoder", model.ocr_embed)
    size = model.page_size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        features = encoder(torch.empty(1, 3, size, size, device="meta"))  # (1, T, V)
    per_page_encoder = counter.get_total_flops()
    proj = _meta_twin("proj", model.proj)
    with FlopCounterMode(display=False) as counter:
        proj(torch.empty_like(features)).float().sum().backward()
    per_page_proj = counter.get_total_flops()
    out = {
        "llm_dense": batch_size * dense,
        "llm_attention_causal": batch_size * attention / 2,
        "encoder_forward": batch_size * pages * per_page_encoder,
        "proj": batch_size * pages * per_page_proj,
    }
    out["total"] = sum(out.values())
    return out


def peak_tflops() -> float | None:
    """Dense bf16 peak of the GPU in use (``OCRMEM_PEAK_TFLOPS`` overrides); ``None`` on CPU/unknown."""
    if os.environ.get("OCRMEM_PEAK_TFLOPS"):
        return float(os.environ["OCRMEM_PEAK_TFLOPS"])
    if not torch.cuda.is_available() or SMOKE:
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class StepRunner:
    """One configuration at one batch shape: build the batch once, then ``step()`` trains on it."""

    def __init__(self, model: nn.Module, config: StepConfig, batch_size: int, pages: int, scale: Scale) -> None:
        self.model, self.config, self.scale = model, config, scale
        self.batch_size, self.pages = batch_size, pages
        self.device = next(model.parameters()).device
        self.batch = make_batch(model, batch_size, pages, scale.recent_tokens)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    @property
    def seq_len(self) -> int:
        return int(self.batch["input_ids"].shape[1])

    def step(self) -> None:
        if SMOKE and self.batch_size > SMOKE_MAX_BATCH:
            raise torch.OutOfMemoryError(f"smoke mode: batch {self.batch_size} > {SMOKE_MAX_BATCH} counts as OOM")
        batch = dict(self.batch)
        if self.config.encoder_input_grad:
            # The user's workaround: the encoder's input becomes a leaf that requires grad.
            batch["pixel_values"] = batch["pixel_values"].detach().requires_grad_(True)
        out = self.model(**batch)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)

    def close(self) -> None:
        self.model.zero_grad(set_to_none=True)
        self.batch = {}
        self.optimizer = None
        _free(self.device)


def first_fitting(
    model: nn.Module, config: StepConfig, pages: int, batch_sizes: list[int], scale: Scale
) -> tuple[StepRunner | None, list[int]]:
    """Try ``batch_sizes`` from the largest down; the first whose first step runs is returned
    (already warmed up by that step), with the batch sizes that ran out of memory."""
    device = next(model.parameters()).device
    oom: list[int] = []
    for batch_size in sorted(batch_sizes, reverse=True):
        runner = None
        try:
            runner = StepRunner(model, config, batch_size, pages, scale)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            runner.step()
            return runner, oom
        except (torch.OutOfMemoryError, RuntimeError) as err:
            # cuBLAS/cuDNN report a failed allocation as a plain RuntimeError.
            if not isinstance(err, torch.OutOfMemoryError) and "out of memory" not in str(err).lower() \
                    and "ALLOC_FAILED" not in str(err):
                raise
            oom.append(batch_size)
        if runner is not None:
            runner.close()
        _free(device)
    return None, oom


def measure(runner: StepRunner, timed_steps: list[float] | None = None) -> dict[str, Any]:
    """Throughput, peak memory and MFU of ``runner`` from the step times in ``timed_steps`` (s)."""
    device = runner.device
    step_s = statistics.median(timed_steps) if timed_steps else None
    flops = useful_flops(runner.model, runner.batch_size, runner.pages, runner.seq_len)
    peak = peak_tflops()
    result: dict[str, Any] = {
        "config": runner.config.name,
        **{f"cfg_{k}": v for k, v in asdict(runner.config).items() if k != "name"},
        "batch_size": runner.batch_size,
        "pages_per_row": runner.pages,
        "seq_len": runner.seq_len,
        "recent_tokens": runner.scale.recent_tokens,
        "llm_train_mode": runner.model.base_llm.training,
        "step_s": step_s,
        "useful_tflop_per_step": flops["total"] / 1e12,
        "useful_tflop_parts": {k: v / 1e12 for k, v in flops.items() if k != "total"},
        "scale": runner.scale.name,
    }
    if step_s:
        result["tokens_per_s"] = runner.batch_size * runner.seq_len / step_s
        result["samples_per_s"] = runner.batch_size / step_s
        result["achieved_tflops"] = flops["total"] / step_s / 1e12
        result["peak_tflops"] = peak
        result["mfu"] = result["achieved_tflops"] / peak if peak else None
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["memory_cap_gib"] = MEMORY_CAP_GIB
    return result


def time_steps(runner: StepRunner, warmup: int, steps: int) -> list[float]:
    """Wall time of ``steps`` steps after ``warmup`` more (each step synchronises the device)."""
    for _ in range(warmup):
        runner.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        runner.step()
        times.append(time.perf_counter() - start)
    return times


__all__ = [
    "CONFIGS",
    "SEED_SCALE",
    "SMOKE",
    "StepConfig",
    "StepRunner",
    "TINY_SCALE",
    "build_meta_model",
    "build_model",
    "configured",
    "device_and_scale",
    "first_fitting",
    "make_batch",
    "measure",
    "peak_tflops",
    "time_steps",
    "useful_flops",
]
