"""Triage the warnings printed while a model loads.

Loading a checkpoint prints messages that look alarming and mostly are not. The
user's report had four: missing ``position_ids`` (a buffer: benign), "You are using
a model of type deepseek_vl_v2 to instantiate a model of type DeepseekOCR"
(informational), "Incompatible transformers version" (remote code's own pin: a
warning to keep in mind) and the ``tokenizer`` -> ``processing_class`` deprecation.

:class:`LoadTriage` captures, during a ``with`` block, transformers' logging records,
other warning-level logging records, Python warnings, and lines printed to
stdout/stderr (remote code prints); :meth:`LoadTriage.findings` classifies them,
checking "not initialized" names against the loaded model's buffers and parameters::

    with LoadTriage() as triage:
        model = MEMModel.from_pretrained(path)
    for finding in triage.findings(model):
        print(finding.to_text())

Both transformers 4.x ("Some weights of X were not initialized ... [names]") and
5.x ("X LOAD REPORT" tables with MISSING / UNEXPECTED rows) are understood.
"""

from __future__ import annotations

import ast
import io
import logging
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, TextIO

from torch import nn

ERROR = "error"
WARNING = "warning"
INFO = "info"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LEGACY_MISSING = re.compile(
    r"Some weights of (?P<model>\S+) were not initialized from the model checkpoint at (?P<path>.+?) and are "
    r"newly initialized(?P<shape> because the shapes did not match)?:\s*(?P<names>\[.*?\])",
    re.S,
)
_LEGACY_UNUSED = re.compile(
    r"Some weights of the model checkpoint at (?P<path>.+?) were not used when initializing (?P<model>\S+?):\s*"
    r"(?P<names>\[.*?\])",
    re.S,
)
_REPORT_HEADER = re.compile(r"(?P<model>\S+) LOAD REPORT")
_REPORT_ROW = re.compile(r"^(?P<key>\S.*?)\s*\|\s*(?P<status>MISSING|UNEXPECTED|MISMATCH\w*)\s*\|", re.M)
_TYPE_MISMATCH = re.compile(
    r"You are using a model of type `?(?P<src>[\w\-.]+)`? to instantiate a model of type `?(?P<dst>[\w\-.]+)`?"
)
_VERSION = re.compile(r"Incompatible transformers version", re.I)
_TOKENIZER_DEPRECATED = re.compile(r"`?tokenizer`? is deprecated.*processing_class", re.I | re.S)

#: buffer names that checkpoints often omit; used when no model is given.
KNOWN_BUFFER_NAMES = frozenset(
    {"position_ids", "inv_freq", "num_batches_tracked", "token_type_ids", "running_mean", "running_var", "masked_bias"}
)


@dataclass(frozen=True)
class TriageFinding:
    """One classified load-time message.

    Attributes:
        severity: ``error``, ``warning`` or ``info``.
        kind: ``missing_buffers``, ``missing_params``, ``unexpected_keys``,
            ``shape_mismatch``, ``model_type_mismatch``, ``version_mismatch``,
            ``deprecation`` or ``other``.
        message: the explanation (what it means, whether to act).
        names: the weight names concerned.
        raw: the first line of the original message.
    """

    severity: str
    kind: str
    message: str
    names: tuple[str, ...] = ()
    raw: str = ""

    def to_text(self) -> str:
        return f"{self.severity}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "kind": self.kind,
            "message": self.message,
            "names": list(self.names),
            "raw": self.raw,
        }


def expand_braces(key: str) -> list[str]:
    """``layers.{0, 1}.bias`` -> ``["layers.0.bias", "layers.1.bias"]`` (transformers 5 tables)."""
    match = re.search(r"\{([^{}]*)\}", key)
    if match is None:
        return [key]
    out = []
    for option in match.group(1).split(","):
        out.extend(expand_braces(key[: match.start()] + option.strip() + key[match.end():]))
    return out


def _names_list(text: str) -> list[str]:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return re.findall(r"'([^']+)'", text)
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def _short(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _split_missing(
    names: Sequence[str], model: Optional[nn.Module], expect_trainable: Sequence[str]
) -> tuple[list[str], list[str], list[str]]:
    """(buffers, parameters expected to train, other parameters)."""
    if model is not None:
        buffers = {n for n, _ in model.named_buffers()}
        params = {n for n, _ in model.named_parameters()}
    else:
        buffers, params = set(), set()

    def is_buffer(name: str) -> bool:
        if name in buffers or any(b.endswith("." + name) or name.endswith("." + b) for b in buffers):
            return True
        if name in params or any(p.endswith("." + name) or name.endswith("." + p) for p in params):
            return False
        return name.rsplit(".", 1)[-1] in KNOWN_BUFFER_NAMES

    from .params import matches

    buffer_names = [n for n in names if is_buffer(n)]
    param_names = [n for n in names if not is_buffer(n)]
    expected = [n for n in param_names if any(matches(n, e) for e in expect_trainable)]
    others = [n for n in param_names if n not in expected]
    return buffer_names, expected, others


def _missing_findings(
    model_name: str, names: Sequence[str], raw: str, model: Optional[nn.Module], expect_trainable: Sequence[str]
) -> list[TriageFinding]:
    buffers, expected, others = _split_missing(names, model, expect_trainable)
    out = []
    if buffers:
        out.append(
            TriageFinding(
                INFO, "missing_buffers",
                f"{model_name}: {_short(buffers)} not in the checkpoint — buffers, not parameters (recomputed "
                "at construction, e.g. position_ids = arange): benign, nothing to do",
                tuple(buffers), raw,
            )
        )
    if expected:
        out.append(
            TriageFinding(
                INFO, "missing_params",
                f"{model_name}: {_short(expected)} newly initialized — these are the parameters you train "
                "(expect_trainable), so starting from random is expected for a fresh run; for a resumed run "
                "it means the trained weights were not saved/loaded",
                tuple(expected), raw,
            )
        )
    if others:
        out.append(
            TriageFinding(
                ERROR, "missing_params",
                f"{model_name}: {len(others)} parameter tensor(s) newly initialized at random because the "
                f"checkpoint lacks them: {_short(others)} — the model will not behave as trained; check the "
                "checkpoint path, the architecture class and key prefixes",
                tuple(others), raw,
            )
        )
    return out


def classify_message(
    text: str, model: Optional[nn.Module] = None, expect_trainable: Sequence[str] = ()
) -> list[TriageFinding]:
    """Classify one captured message (it may yield several findings).

    Args:
        text: the message (ANSI colour codes are ignored).
        model: the loaded model, to tell buffers from parameters.
        expect_trainable: prefixes of parameters trained from scratch.
    """
    text = _ANSI.sub("", text)
    raw = text.strip().splitlines()[0] if text.strip() else ""
    out: list[TriageFinding] = []
    for match in _LEGACY_MISSING.finditer(text):
        names = _names_list(match.group("names"))
        if match.group("shape"):
            out.append(
                TriageFinding(
                    ERROR, "shape_mismatch",
                    f"{match.group('model')}: {_short(names)} had a different shape in the checkpoint and were "
                    "re-initialized at random — the config does not match the checkpoint",
                    tuple(names), raw,
                )
            )
        else:
            out.extend(_missing_findings(match.group("model"), names, raw, model, expect_trainable))
    for match in _LEGACY_UNUSED.finditer(text):
        names = _names_list(match.group("names"))
        out.append(
            TriageFinding(
                INFO, "unexpected_keys",
                f"{match.group('model')}: the checkpoint holds {len(names)} tensor(s) the model does not use "
                f"({_short(names)}) — expected when loading a checkpoint of another task/architecture "
                "(e.g. a pretraining head); a problem only if you expect an identical architecture",
                tuple(names), raw,
            )
        )
    header = _REPORT_HEADER.search(text)
    if header is not None:
        model_name = header.group("model")
        rows: dict[str, list[str]] = {}
        for row in _REPORT_ROW.finditer(text):
            status = row.group("status")
            rows.setdefault("MISMATCH" if status.startswith("MISMATCH") else status, []).extend(
                expand_braces(row.group("key").strip())
            )
        if rows.get("MISSING"):
            out.extend(_missing_findings(model_name, rows["MISSING"], raw, model, expect_trainable))
        if rows.get("UNEXPECTED"):
            names = rows["UNEXPECTED"]
            out.append(
                TriageFinding(
                    INFO, "unexpected_keys",
                    f"{model_name}: the checkpoint holds {len(names)} tensor(s) the model does not use "
                    f"({_short(names)}) — expected across tasks/architectures; a problem only if you expect "
                    "an identical architecture",
                    tuple(names), raw,
                )
            )
        if rows.get("MISMATCH"):
            names = rows["MISMATCH"]
            out.append(
                TriageFinding(
                    ERROR, "shape_mismatch",
                    f"{model_name}: {_short(names)} have a different shape in the checkpoint and were "
                    "re-initialized — the config does not match the checkpoint",
                    tuple(names), raw,
                )
            )
    match = _TYPE_MISMATCH.search(text)
    if match is not None:
        out.append(
            TriageFinding(
                INFO, "model_type_mismatch",
                f"the checkpoint's config says model_type `{match.group('src')}` but it is loaded as "
                f"`{match.group('dst')}`: informational when the class is meant to read that checkpoint "
                "(as DeepseekOCR reads deepseek_vl_v2); check the missing/unexpected weights above to be sure",
                (), raw,
            )
        )
    if _VERSION.search(text):
        out.append(
            TriageFinding(
                WARNING, "version_mismatch",
                "remote code pins a transformers range older than the installed one: it usually still loads, "
                "but APIs it relies on may have changed — test the forward, or use code that does not need "
                "trust_remote_code",
                (), raw,
            )
        )
    if _TOKENIZER_DEPRECATED.search(text):
        out.append(
            TriageFinding(
                WARNING, "deprecation",
                "the Trainer's `tokenizer` argument is deprecated: pass `processing_class=` instead",
                (), raw,
            )
        )
    return out


class _Tee(io.TextIOBase):
    """Write-through text stream that also keeps what was written."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self.buffer_text: list[str] = []

    def write(self, text: str) -> int:  # type: ignore[override]
        self.buffer_text.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")

    def isatty(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(level=logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.append(record.getMessage())
        except Exception:  # a broken record must not break loading
            pass


@dataclass
class LoadTriage:
    """Capture load-time messages; classify them with :meth:`findings`.

    Args:
        capture_stdio: also record what is printed to stdout/stderr (written through).
        expect_trainable: parameter prefixes trained from scratch (their absence from
            a checkpoint is expected).

    Python warnings raised inside the block are recorded and not shown again.
    """

    capture_stdio: bool = True
    expect_trainable: Sequence[str] = ()
    messages: list[str] = field(default_factory=list)
    _saved: list[Any] = field(default_factory=list, repr=False)

    def __enter__(self) -> "LoadTriage":
        handler = _ListHandler(self.messages)
        hf_logger = logging.getLogger("transformers")
        root = logging.getLogger()
        old_level = hf_logger.level
        if hf_logger.getEffectiveLevel() > logging.WARNING:
            hf_logger.setLevel(logging.WARNING)
        hf_logger.addHandler(handler)
        root.addHandler(handler)
        warn_ctx = warnings.catch_warnings(record=True)
        caught = warn_ctx.__enter__()
        warnings.simplefilter("always")
        tees: tuple[Optional[_Tee], Optional[_Tee]] = (None, None)
        if self.capture_stdio:
            tees = (_Tee(sys.stdout), _Tee(sys.stderr))
            sys.stdout, sys.stderr = tees  # type: ignore[assignment]
        self._saved = [handler, hf_logger, root, old_level, warn_ctx, caught, tees]
        return self

    def __exit__(self, *exc_info: Any) -> None:
        handler, hf_logger, root, old_level, warn_ctx, caught, tees = self._saved
        if tees[0] is not None:
            sys.stdout, sys.stderr = tees[0].stream, tees[1].stream
            for tee in tees:
                text = "".join(tee.buffer_text)
                if text.strip():
                    self.messages.append(text)
        warn_ctx.__exit__(*exc_info)
        for w in caught:
            self.messages.append(f"{w.category.__name__}: {w.message}")
        hf_logger.removeHandler(handler)
        root.removeHandler(handler)
        hf_logger.setLevel(old_level)

    def findings(
        self, model: Optional[nn.Module] = None, expect_trainable: Optional[Sequence[str]] = None
    ) -> list[TriageFinding]:
        """Classified findings, deduplicated (the same message may arrive twice)."""
        expect = tuple(expect_trainable if expect_trainable is not None else self.expect_trainable)
        out: list[TriageFinding] = []
        seen: set[tuple[str, str, tuple[str, ...]]] = set()
        for message in self.messages:
            for finding in classify_message(message, model, expect):
                key = (finding.kind, finding.severity, finding.names)
                if key not in seen:
                    seen.add(key)
                    out.append(finding)
        return out


def triage_messages(
    messages: Iterable[str], model: Optional[nn.Module] = None, expect_trainable: Sequence[str] = ()
) -> list[TriageFinding]:
    """Classify messages captured elsewhere (e.g. a training log)."""
    triage = LoadTriage(capture_stdio=False, expect_trainable=expect_trainable)
    triage.messages.extend(messages)
    return triage.findings(model)


__all__ = [
    "KNOWN_BUFFER_NAMES",
    "LoadTriage",
    "TriageFinding",
    "classify_message",
    "expand_braces",
    "triage_messages",
]
