"""Helpers shared by the benchmark files: side-by-side timing, saved-for-backward accounting, machine facts.

Every comparison in ``benchmarks/`` is a ratio against a baseline measured in the same process,
interleaved round by round (:class:`SideBySide`): the CPUs are shared with other jobs, and a
slow minute then slows both sides of a round instead of one side of the comparison.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class SideBySide:
    """Time several candidates interleaved: one call of each per round, rotating who goes first.

    Args:
        candidates: name -> zero-argument callable (one training step, one render, ...). A
            callable that returns a float reports its own duration in seconds (to leave its
            set-up out); otherwise the wall time of the call is recorded.
        baseline: The name the others are compared with.
    """

    def __init__(self, candidates: dict[str, Callable[[], Any]], baseline: str) -> None:
        if baseline not in candidates:
            raise ValueError(f"`baseline` is {baseline!r}, not one of the candidates {sorted(candidates)}.")
        self.candidates = candidates
        self.baseline = baseline
        self.times: dict[str, list[float]] = {name: [] for name in candidates}
        self._round = 0

    def round(self) -> None:
        """Run every candidate once (the start rotates each round) and record its wall time."""
        names = list(self.candidates)
        shift = self._round % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            reported = self.candidates[name]()
            elapsed = time.perf_counter() - start
            self.times[name].append(reported if isinstance(reported, float) else elapsed)
        self._round += 1

    def reset(self) -> None:
        """Forget recorded times (after warm-up rounds)."""
        self.times = {name: [] for name in self.candidates}

    def ratio(self, name: str, reference: str) -> float:
        """Median over rounds of ``time(name) / time(reference)`` within the same round.

        Each round's ratio uses that round's reference time, so a slow-down shared by both
        sides cancels; the median discards the rounds another job disturbed.
        """
        return statistics.median(t / r for t, r in zip(self.times[name], self.times[reference]))

    def summary(self, extra_pairs: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
        """Median and minimum time per candidate, ``ratio_<name>_vs_<baseline>`` for every other
        candidate, and ``ratio_<a>_vs_<b>`` for each pair in ``extra_pairs``."""
        out: dict[str, Any] = {"rounds": len(self.times[self.baseline]), "baseline": self.baseline}
        for name, times in self.times.items():
            out[f"{name}_median_s"] = statistics.median(times)
            out[f"{name}_min_s"] = min(times)
        pairs = [(name, self.baseline) for name in self.times if name != self.baseline] + list(extra_pairs)
        for name, reference in pairs:
            out[f"ratio_{name}_vs_{reference}"] = self.ratio(name, reference)
        return out


class SavedTensorBytes:
    """Count what autograd saves for backward while the context is open (the forward pass).

    Every tensor handed to the pack hook of ``torch.autograd.graph.saved_tensors_hooks`` is
    counted as ``numel * element_size`` and sorted into one of three kinds:

    * ``weights`` — a parameter of ``model`` (a frozen ``Linear`` saves its weight to compute its
      input gradient). It exists anyway: saving it costs no memory.
    * ``checkpoint_inputs`` — the inputs a non-reentrant activation checkpoint saves for itself
      (``hidden_states`` of each checkpointed decoder layer, saved through torch's
      ``_NoopSaveInputs`` *outside* the checkpoint's own hooks, so ours see them). Everything a
      checkpointed layer saves *inside* is intercepted by the checkpoint's hooks, dropped and
      recomputed in backward: it is not counted, because it is not held.
    * ``activations`` — everything else: what tracking costs.

    ``*_unique`` counts a tensor saved by several ops once (same data pointer, size and dtype).
    """

    KINDS = ("weights", "checkpoint_inputs", "activations")

    def __init__(self, model: nn.Module) -> None:
        self._param_ptrs = {p.data_ptr() for p in model.parameters()}
        self._layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
        self._checkpoint_input_ids: set[int] = set()
        self._saved: list[tuple[torch.Tensor, int]] = []
        self._handles: list[Any] = []
        self._hooks: Any = None

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module.training and args and isinstance(args[0], torch.Tensor):
            self._checkpoint_input_ids.add(id(args[0]))

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        # Keep a reference: ids stay unique while we hold it, and autograd holds it anyway.
        self._saved.append((tensor, tensor.numel() * tensor.element_size()))
        return tensor

    def __enter__(self) -> "SavedTensorBytes":
        self._handles = [layer.register_forward_pre_hook(self._pre_hook) for layer in self._layers]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()

    def result(self) -> dict[str, int]:
        """Bytes per kind (sum over packed tensors and unique), total and the number of tensors."""
        out = {"saved_tensors": len(self._saved), "total_bytes": 0}
        for kind in self.KINDS:
            out[f"{kind}_bytes"] = 0
            out[f"{kind}_unique_bytes"] = 0
        seen: set[tuple[int, int, torch.dtype]] = set()
        for tensor, nbytes in self._saved:
            if tensor.data_ptr() in self._param_ptrs:
                kind = "weights"
            elif id(tensor) in self._checkpoint_input_ids:
                kind = "checkpoint_inputs"
            else:
                kind = "activations"
            out["total_bytes"] += nbytes
            out[f"{kind}_bytes"] += nbytes
            key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
            if key not in seen:
                seen.add(key)
                out[f"{kind}_unique_bytes"] += nbytes
        out["held_bytes"] = out["activations_unique_bytes"] + out["checkpoint_inputs_unique_bytes"]
        self._saved.clear()
        return out


def cpu_model_name() -> str | None:
    """The CPU's marketing name from ``/proc/cpuinfo`` (``None`` where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_facts() -> dict[str, Any]:
    """What RESULTS.md needs to say where the numbers come from."""
    import transformers

    facts: dict[str, Any] = {
        "cpu_model": cpu_model_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(
            gpu_name=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    return facts


__all__ = ["SavedTensorBytes", "SideBySide", "cpu_model_name", "machine_facts"]
