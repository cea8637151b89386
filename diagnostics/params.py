"""Parameter counts per module, in the user's own format, and trainability checks.

The user's healthy state reads::

    trainable params: 18,882,560 || all params: 8,607,498,496 || trainable%: 0.2194%
    Detailed breakdown:
      base_llm_model trainable params: 0 (should be 0)
      ocr_embed trainable params: 0 (should be 0)
      proj trainable params: 18,882,560

:func:`parameter_table` computes those numbers for any ``nn.Module`` (shared
parameters counted once) and :func:`check_expectations` turns ``expect_trainable``
prefixes into findings.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from torch import nn

from .causes import Finding


@dataclass
class ModuleParams:
    """Parameter counts of one module subtree.

    Attributes:
        name: qualified module name (``""`` for the root).
        total: number of parameter elements in the subtree.
        trainable: elements with ``requires_grad=True``.
        children: the child subtrees (only filled down to the requested depth).
    """

    name: str
    total: int
    trainable: int
    children: list["ModuleParams"] = field(default_factory=list)

    @property
    def frozen(self) -> int:
        """Elements with ``requires_grad=False``."""
        return self.total - self.trainable

    def to_json(self) -> dict[str, Any]:
        """Nested ``{"name", "total", "trainable", "children"}``."""
        data: dict[str, Any] = {"name": self.name, "total": self.total, "trainable": self.trainable}
        if self.children:
            data["children"] = [c.to_json() for c in self.children]
        return data


@dataclass
class ParameterTable:
    """Totals for a model plus the per-module breakdown at the report level.

    Attributes:
        total: all parameter elements (shared parameters once).
        trainable: elements with ``requires_grad=True``.
        modules: report-level modules in registration order.
        tree: the nested tree from the root (depth-limited).
        expected: report-level module name -> whether ``expect_trainable`` covers it
            (empty when no expectation was given).
    """

    total: int
    trainable: int
    modules: list[ModuleParams]
    tree: ModuleParams
    expected: dict[str, bool] = field(default_factory=dict)

    def summary_line(self) -> str:
        """The user's one-line format, thousands separators and 4 decimals."""
        return summary_line(self.trainable, self.total)

    def breakdown_lines(self) -> list[str]:
        """``  proj trainable params: N`` lines; ``(should be 0)`` on frozen-by-design modules."""
        lines = []
        for module in self.modules:
            line = f"  {module.name} trainable params: {module.trainable:,}"
            if self.expected:
                if not self.expected.get(module.name, False):
                    line += " (should be 0)" if module.trainable == 0 else " (expected 0)"
            elif module.trainable == 0:
                line += " (frozen)"
            lines.append(line)
        return lines

    def to_json(self) -> dict[str, Any]:
        """``{"total", "trainable", "modules": {NAME: {"total", "trainable"}}, ...}``."""
        return {
            "total": self.total,
            "trainable": self.trainable,
            "modules": {m.name: {"total": m.total, "trainable": m.trainable} for m in self.modules},
            "line": self.summary_line(),
            "tree": self.tree.to_json(),
        }


def summary_line(trainable: int, total: int) -> str:
    """``trainable params: N || all params: M || trainable%: P%`` — the user's own format."""
    percent = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}%"


def report_level_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules a report talks about.

    The root's children, except that wrappers with a single parameter-holding child
    (``PeftModel`` -> ``LoraModel`` -> ``LlamaForCausalLM``) are looked through, so a
    LoRA model reports ``base_model.model.model`` and ``base_model.model.lm_head``
    instead of one opaque ``base_model``. Parameters owned directly by a looked-through
    module are reported under that module's own name.
    """
    prefix = ""
    current = model
    for _ in range(8):  # wrappers are shallow; bound the loop anyway
        holding = [(n, c) for n, c in current.named_children() if _has_params(c)]
        if len(holding) != 1 or any(True for _ in current.parameters(recurse=False)):
            break
        name, current = holding[0]
        prefix = f"{prefix}{name}."
    children = [(f"{prefix}{n}", c) for n, c in current.named_children()]
    if any(True for _ in current.parameters(recurse=False)) or not children:
        own = prefix.rstrip(".") or "(root)"
        children.insert(0, (own + ":own" if children else own, current))
    return children


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _count(params: Iterable[nn.Parameter], seen: Optional[set[int]] = None) -> tuple[int, int]:
    total = trainable = 0
    for p in params:
        if seen is not None:
            if id(p) in seen:
                continue
            seen.add(id(p))
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable


class _SubtreeCounts:
    """(total, trainable) of every module's subtree, shared parameters once per subtree.

    One post-order pass over the modules, each module's own ``_parameters`` read once:
    ``module.parameters()`` per module would walk every subtree again (quadratic in depth).
    """

    def __init__(self, model: nn.Module) -> None:
        self._ids: dict[int, dict[int, tuple[int, bool]]] = {}
        self._counts: dict[int, tuple[int, int]] = {}
        self._build(model)

    def _build(self, root: nn.Module) -> None:
        stack: list[tuple[nn.Module, bool]] = [(root, False)]
        while stack:
            module, ready = stack.pop()
            key = id(module)
            if key in self._ids and not ready:
                continue
            children = [c for c in module._modules.values() if c is not None]
            if not ready:
                stack.append((module, True))
                stack.extend((c, False) for c in children if id(c) not in self._ids)
                continue
            params: dict[int, tuple[int, bool]] = {
                id(p): (p.numel(), p.requires_grad) for p in module._parameters.values() if p is not None
            }
            for child in children:
                params.update(self._ids[id(child)])
            self._ids[key] = params
            self._counts[key] = (
                sum(n for n, _ in params.values()),
                sum(n for n, trains in params.values() if trains),
            )

    def of(self, module: nn.Module) -> tuple[int, int]:
        """(total, trainable) elements under ``module``."""
        return self._counts[id(module)]


def _tree(name: str, module: nn.Module, depth: int, counts: _SubtreeCounts) -> ModuleParams:
    total, trainable = counts.of(module)
    node = ModuleParams(name, total, trainable)
    if depth > 0:
        for child_name, child in module.named_children():
            qualified = f"{name}.{child_name}" if name else child_name
            node.children.append(_tree(qualified, child, depth - 1, counts))
    return node


def parameter_table(
    model: nn.Module, expect_trainable: Optional[Sequence[str]] = None, tree_depth: int = 3
) -> ParameterTable:
    """Count parameters of ``model``.

    Args:
        model: any module.
        expect_trainable: parameter-name prefixes (or ``fnmatch`` patterns) expected
            to train; used for the ``(should be 0)`` markers.
        tree_depth: depth of the nested tree in the JSON output.

    Returns:
        The table; shared (tied) parameters are counted once in the totals.
    """
    counts = _SubtreeCounts(model)
    total, trainable = counts.of(model)
    modules = []
    for name, module in report_level_modules(model):
        if name.endswith(":own"):
            t, tr = _count(module.parameters(recurse=False))
        else:
            t, tr = counts.of(module)
        modules.append(ModuleParams(name, t, tr))
    expected: dict[str, bool] = {}
    if expect_trainable:
        names = [n for n, _ in model.named_parameters()]
        for module in modules:
            base = module.name.removesuffix(":own")
            expected[module.name] = any(
                matches(n, p) for p in expect_trainable for n in names if _under(n, base)
            )
    return ParameterTable(total, trainable, modules, _tree("", model, tree_depth, counts), expected)


def _under(param_name: str, module_name: str) -> bool:
    return module_name in ("", "(root)") or param_name.startswith(module_name + ".")


def matches(param_name: str, pattern: str) -> bool:
    """Whether ``param_name`` falls under an ``expect_trainable`` entry.

    An entry is a dotted prefix (``proj`` matches ``proj.0.weight`` but not
    ``projector.weight``), an exact name, or an ``fnmatch`` pattern when it contains
    ``*``, ``?`` or ``[`` (``*lora_*``).
    """
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(param_name, pattern)
    pattern = pattern.rstrip(".")
    return param_name == pattern or param_name.startswith(pattern + ".")


def check_expectations(
    model: nn.Module,
    expect_trainable: Optional[Sequence[str]] = None,
    freeze_sites: Optional[dict[str, Any]] = None,
    guessed_sites: Optional[dict[str, Any]] = None,
) -> list[Finding]:
    """Findings for a model with no trainable parameters or unmet expectations.

    Args:
        model: the model.
        expect_trainable: prefixes/patterns that must match at least one parameter,
            all with ``requires_grad=True``.
        freeze_sites: parameter name -> :class:`~diagnostics.source.SourceLocation`
            of the statement that froze it (from a construction watch or the static
            scan), used to point at the line.

    Returns:
        ``no_trainable_params`` / ``not_trainable`` errors.
    """
    from .causes import no_trainable_params, not_trainable

    findings: list[Finding] = []
    named = list(model.named_parameters())
    if not any(p.requires_grad for _, p in named):
        known = {**(guessed_sites or {}), **(freeze_sites or {})}
        site = next((known[n] for n, _ in named if n in known), None)  # where the expected ones were frozen
        findings.append(no_trainable_params.finding(len(named), site))
    for pattern in expect_trainable or ():
        hits = [(n, p) for n, p in named if matches(n, pattern)]
        if not hits:
            findings.append(not_trainable.no_match(pattern, sorted({n.split(".")[0] for n, _ in named})))
            continue
        frozen = [n for n, p in hits if not p.requires_grad]
        if not frozen:
            continue
        site = guess = None
        if freeze_sites:
            site = next((freeze_sites[n] for n in frozen if n in freeze_sites), None)
        if site is None and guessed_sites:
            site = guess = next((guessed_sites[n] for n in frozen if n in guessed_sites), None)
        peft = not_trainable.is_peft(model)
        names: list[str] = []
        prefix = ""
        if peft and hasattr(model, "get_base_model"):
            base = model.get_base_model()
            names = [n for n, _ in base.named_modules(remove_duplicate=False)]
            prefix = next((n for n, m in model.named_modules() if m is base), "")
        findings.append(
            not_trainable.frozen_expected(pattern, frozen, len(hits), site, peft, names, prefix, guessed=guess is not None)
        )
    return findings


__all__ = [
    "ModuleParams",
    "ParameterTable",
    "check_expectations",
    "matches",
    "parameter_table",
    "report_level_modules",
    "summary_line",
]
