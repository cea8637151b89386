"""Checks of what callers hand to ``MEMModel`` and of the directories it reads and writes.

Every check raises with the argument or file, the value, and the fix, instead of letting torch
or transformers fail later with a message that names neither ("index out of range in self",
"upgrade transformers"), or — worse — run on with a silently wrong result (0..255 pixels, a
``-1`` ignore index, a fresh ``proj`` where a trained one was meant).

``validate_inputs`` runs at the top of every ``MEMModel.forward``, so it is kept cheap: shape
and dtype checks cost nothing, and every value check (token ids in the vocabulary, 0/1 mask,
label range, finite pixels in range) is reduced on the device and read back in one sync. The
overhead on the tiny preset is measured in ``benchmarks/test_bench_validation.py``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from . import compat
from .errors import CheckpointError, ConfigError, InputError, InputTypeError, PixelRangeWarning, RemoteCodeError

IGNORE_INDEX = -100
# Pages are normalised to [-1, 1] (DeepSeek-OCR: mean = std = 0.5); CLIP's mean/std would give
# about [-1.8, 2.2], and standard-normal test pages reach about +-5. 0..255 pixels (any page
# with white paper on it) lie far beyond this bound; a normalised page never does.
PIXEL_LIMIT = 16.0


# ----------------------------------------------------------------------------- forward inputs


def _where(mask: torch.Tensor) -> tuple[list[int], int]:
    """The first position where ``mask`` is true (only called when it is somewhere), and how many are."""
    hits = mask.nonzero()  # (K, ndim)
    return hits[0].tolist(), hits.shape[0]


def _check_int_tensor(name: str, value: Any, shape: tuple[int, ...] | None, fix: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise InputTypeError(f"`{name}` has type {type(value).__name__}; pass a torch.Tensor of token ids (torch.long). {fix}")
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise InputTypeError(
            f"`{name}` has dtype {value.dtype}; it must be an integer tensor (torch.long): use `{name}.long()` "
            f"if the values are whole numbers. {fix}"
        )
    if shape is not None and tuple(value.shape) != shape:
        raise InputError(f"`{name}` has shape {tuple(value.shape)} but `input_ids` has shape {shape}; give one value per token. {fix}")


def validate_inputs(
    input_ids: Any,
    attention_mask: Any,
    labels: Any,
    pixel_values: Any,
    position_ids: Any,
    vocab_size: int,
    page_size: int,
) -> None:
    """Check the arguments of ``MEMModel.forward`` before any of them reaches torch.

    Args:
        input_ids: (B, L) integer token ids in ``[0, vocab_size)``.
        attention_mask: ``None`` or (B, L) of 0/1 (any dtype).
        labels: ``None`` or (B, L) integer, each ``-100`` (ignored) or in ``[0, vocab_size)``.
        pixel_values: ``None`` or (P, 3, page_size, page_size) float, finite, normalised.
        position_ids: ``None`` or (B, L) / (1, L) integer.
        vocab_size: Rows of the LLM's input embedding.
        page_size: The encoder's page side.

    Raises:
        InputTypeError: A wrong type or dtype.
        InputError: A wrong shape or value.
    """
    _check_int_tensor("input_ids", input_ids, None, "Tokenise text with the LLM's tokenizer.")
    if input_ids.ndim != 2:
        fix = "for one row pass `input_ids.unsqueeze(0)` (and the same for attention_mask and labels)"
        raise InputError(
            f"`input_ids` has shape {tuple(input_ids.shape)}; it must be 2-D (batch, seq_len): "
            + (fix if input_ids.ndim == 1 else "one row of token ids per example")
            + "."
        )
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise InputError(f"`input_ids` has shape {tuple(input_ids.shape)}; give at least one row of at least one token.")
    shape = tuple(input_ids.shape)
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise InputTypeError(f"`attention_mask` has type {type(attention_mask).__name__}; pass a torch.Tensor of 0/1 or None.")
        if tuple(attention_mask.shape) != shape:
            raise InputError(
                f"`attention_mask` has shape {tuple(attention_mask.shape)} but `input_ids` has shape {shape}; "
                "give one 0/1 per token (1 = real token, 0 = padding), or None."
            )
    if labels is not None:
        _check_int_tensor("labels", labels, shape, f"Labels are token ids, or {IGNORE_INDEX} where no loss is taken.")
    if position_ids is not None:
        _check_int_tensor("position_ids", position_ids, None, "Or pass None: positions are then derived from attention_mask.")
        if position_ids.ndim != 2 or position_ids.shape[1] != shape[1] or position_ids.shape[0] not in (1, shape[0]):
            raise InputError(
                f"`position_ids` has shape {tuple(position_ids.shape)}; use ({shape[0]}, {shape[1]}) or (1, {shape[1]}) "
                "to match `input_ids`, or None."
            )
    if pixel_values is not None:
        _check_pixel_types(pixel_values, page_size)

    # Every value check reduced on the device, then one read-back.
    stats = [input_ids.min(), input_ids.max()]
    if attention_mask is not None:
        stats.append(((attention_mask != 0) & (attention_mask != 1)).any())
    if labels is not None:
        stats.append(((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))).any())
    if pixel_values is not None and pixel_values.numel():
        stats.extend(torch.aminmax(pixel_values.detach()))
    values = torch.stack([s.to(torch.float64) for s in stats]).tolist()
    low, high, rest = values[0], values[1], values[2:]
    if low < 0 or high >= vocab_size:
        (row, col), count = _where((input_ids < 0) | (input_ids >= vocab_size))
        value = int(input_ids[row, col])
        hint = f" ({IGNORE_INDEX} is the label ignore index: were labels passed as input_ids?)" if value == IGNORE_INDEX else ""
        raise InputError(
            f"`input_ids` holds token id {value} at [{row}, {col}] ({count} ids in all) outside the LLM's vocabulary "
            f"0..{vocab_size - 1}{hint}. Tokenise with the tokenizer of `base_model_name`."
        )
    if attention_mask is not None:
        if rest.pop(0):
            (row, col), count = _where((attention_mask != 0) & (attention_mask != 1))
            raise InputError(
                f"`attention_mask` holds {attention_mask[row, col].item()!r} at [{row}, {col}] ({count} values in all); "
                "use 1 for real tokens and 0 for padding."
            )
    if labels is not None:
        if rest.pop(0):
            bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
            (row, col), count = _where(bad)
            value = int(labels[row, col])
            if value < 0:
                fix = f"the ignore index is {IGNORE_INDEX}, not {value}: `labels[labels == {value}] = {IGNORE_INDEX}`"
            else:
                fix = f"labels are token ids of the LLM's vocabulary 0..{vocab_size - 1}, or {IGNORE_INDEX} for no loss"
            raise InputError(f"`labels` holds {value} at [{row}, {col}] ({count} values in all); {fix}.")
    if pixel_values is not None and pixel_values.numel():
        low, high = rest
        if not (torch.isfinite(torch.tensor([low, high])).all()):
            nan = int(torch.isnan(pixel_values).sum())
            inf = int(torch.isinf(pixel_values).sum())
            page = int((~torch.isfinite(pixel_values)).flatten(1).any(1).nonzero()[0])
            raise InputError(
                f"`pixel_values` holds {nan} NaN and {inf} inf values (first on page {page}); pages must be finite. "
                "Render them with ocrmem.rendering (PageRenderer.to_pixel_values / pixel_values_from_text)."
            )
        if low < -PIXEL_LIMIT or high > PIXEL_LIMIT:
            raise InputError(
                f"`pixel_values` range from {low:g} to {high:g}; pages must be normalised to [-1, 1] "
                f"(these look like raw 0..255 pixels): use `pixel_values / 127.5 - 1`, or "
                "PageRenderer.to_pixel_values(pages)."
            )
        if 0.0 <= low < 1.0 and high <= 1.0:
            # Normalised, black ink is -1 (CLIP: -1.8) and white 1: a darkest pixel in [0, 1) is
            # what 0..1 pixels (torchvision's ToTensor) give. Warned, not refused: a page of
            # faint grey only would look the same.
            warnings.warn(
                f"`pixel_values` range from {low:g} to {high:g}: no pixel is darker than mid-grey, as with 0..1 "
                "pixels (ToTensor) rather than pages normalised to [-1, 1] (black text is -1). If so, use "
                "`pixel_values * 2 - 1`, or PageRenderer.to_pixel_values(pages).",
                PixelRangeWarning,
                stacklevel=3,
            )


def _check_pixel_types(pixel_values: Any, page_size: int) -> None:
    fix = "Render pages with ocrmem.rendering: PageRenderer.to_pixel_values(pages) or pixel_values_from_text()."
    if not isinstance(pixel_values, torch.Tensor):
        raise InputTypeError(f"`pixel_values` has type {type(pixel_values).__name__}; pass a float torch.Tensor (P, 3, S, S) or None. {fix}")
    if not pixel_values.is_floating_point():
        raise InputTypeError(
            f"`pixel_values` has dtype {pixel_values.dtype} (raw pixels?); the encoder takes float pages normalised "
            f"to [-1, 1]: use `pixel_values.float() / 127.5 - 1`. {fix}"
        )
    expected = (3, page_size, page_size)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise InputError(
            f"`pixel_values` has shape {tuple(pixel_values.shape)}; this model's encoder reads pages of shape "
            f"(P, 3, {page_size}, {page_size}) (page_size={page_size}). {fix}"
        )


def check_sequence_length(
    base_llm: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    tokens_per_page: int,
) -> None:
    """Refuse a merged row longer than the LLM's ``max_position_embeddings``.

    RoPE models run past it without an error, on positions they never saw in training: the
    result is silently worse. Free unless the padded length exceeds the limit.

    Raises:
        InputError: Naming the length, the limit and the fix.
    """
    limit = getattr(getattr(base_llm, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or input_ids.shape[1] <= limit:
        return
    longest = int(position_ids.max()) + 1
    if longest <= limit:
        return
    pages = 0 if pixel_values is None else int(pixel_values.shape[0])
    raise InputError(
        f"a row spans {longest} positions (the batch holds {pages} pages x {tokens_per_page} memory tokens plus text), "
        f"more than the LLM's max_position_embeddings={limit}. Shorten the recent text, lower `max_pages` "
        f"(each page is {tokens_per_page} tokens) or lower `context_threshold` (more history is compressed)."
    )


def literal_memory_token_message(memory_token: str, token_id: int, count: int) -> str:
    """Why ``input_ids`` may hold memory tokens without pages, and the two fixes."""
    return (
        f"`input_ids` hold {count} memory tokens ({memory_token!r}, id {token_id}) but `pixel_values` is None. "
        f"On the fast path, pass the pages those tokens stand for as `pixel_values`. On the seed path, the chat "
        f"text contains {memory_token!r} literally (which would switch history compression off): remove or replace "
        f"it before tokenising, e.g. text.replace({memory_token!r}, {memory_token.replace('|', '')!r})."
    )


def check_parts(base_llm: Any, ocr_embed: Any, tokenizer: Any) -> None:
    """Ready-made parts handed to ``MEMModel`` must be what their names say.

    Raises:
        InputTypeError: Naming the argument (a path string passed as ``base_llm``, say).
    """
    if base_llm is not None and not (isinstance(base_llm, torch.nn.Module) and hasattr(base_llm, "get_input_embeddings")):
        raise InputTypeError(
            f"`base_llm` has type {type(base_llm).__name__}; pass a loaded causal LM (a transformers PreTrainedModel), "
            "or None to load `base_model_name`."
        )
    if ocr_embed is not None and not (isinstance(ocr_embed, torch.nn.Module) and hasattr(ocr_embed, "output_dim")):
        raise InputTypeError(
            f"`ocr_embed` has type {type(ocr_embed).__name__}; pass an ocrmem.encoder.DeepEncoder, or None to load "
            "`ocr_model_name`."
        )
    if tokenizer is not None and not callable(getattr(tokenizer, "convert_tokens_to_ids", None)):
        raise InputTypeError(
            f"`tokenizer` has type {type(tokenizer).__name__}; pass the LLM's transformers tokenizer, or None to load it "
            "from `base_model_name`."
        )


# ----------------------------------------------------------------------------- weights


def check_finite(named_tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Refuse NaN/inf weights at load: they would run, and every output would be NaN.

    Raises:
        CheckpointError: Naming the first non-finite tensor and ``source``.
    """
    for name, tensor in named_tensors:
        if not tensor.is_floating_point() or tensor.device.type == "meta" or not tensor.numel():
            continue
        tensor = tensor.detach()
        # A sum is NaN/inf when any element is (NaN propagates, inf - inf is NaN), and costs one
        # vectorised pass without a mask: ~20x faster than isfinite().all() on CPU. It can also
        # overflow (fp16 weights summing past 65504): only then is every element checked.
        if bool(torch.isfinite(tensor.sum())):
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            nan = int(torch.isnan(tensor).sum())
            inf = int((~finite).sum()) - nan
            raise CheckpointError(
                f"{source}: tensor {name!r} holds {nan} NaN and {inf} inf values (of {tensor.numel()}); the weights "
                "are corrupt or come from a diverged run. Load an earlier checkpoint (or re-export the model)."
            )


# ----------------------------------------------------------------------------- directories


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """``path``'s JSON object.

    Raises:
        CheckpointError: The file is not valid JSON, or holds something other than an object.
    """
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); {what} must be a JSON object.") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object; {what} must be a JSON object.")
    return value


def check_llm_dir(path: Path, field: str = "base_model_name") -> None:
    """Refuse an LLM directory transformers would misread, before it tries.

    Raises:
        CheckpointError: No ``config.json``, or not a JSON object.
        RemoteCodeError: ``config.json`` / ``tokenizer_config.json`` name custom code (``auto_map``).
        ConfigError: ``model_type`` is not a causal LM this transformers builds (for instance
            the DeepSeek-OCR dir given as the LLM), where transformers would say "upgrade".
    """
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"`{field}` = {str(path)!r} has no config.json: not a transformers model directory. "
            f"Point `{field}` at the LLM's checkout (e.g. Qwen3-8B)."
        )
    config = read_json_object(config_file, "a model config")
    for file in (config_file, path / "tokenizer_config.json"):
        data = config if file is config_file else (read_json_object(file, "a tokenizer config") if file.is_file() else {})
        if data.get("auto_map"):
            raise RemoteCodeError(
                f"`{field}` = {str(path)!r}: {file.name} has `auto_map` {data['auto_map']!r}, i.e. it asks to run Python "
                "code from the model directory, which ocrmem never does (trust_remote_code=False). Use a model stock "
                f"transformers {compat.TRANSFORMERS_VERSION} supports; if the architecture is a stock one "
                f"(model_type {config.get('model_type')!r}), delete `auto_map` from {file}."
            )
    model_type = config.get("model_type")
    if not compat.is_causal_lm_type(model_type):
        ocr_hint = (
            " — this is an OCR checkpoint (DeepSeek-OCR): it belongs in `ocr_model_name`"
            if model_type == "deepseek_vl_v2" or "ocrmem_encoder" in config
            else ""
        )
        raise ConfigError(
            f"`{field}` = {str(path)!r} holds a model of type {model_type!r}, which is not a causal LM transformers "
            f"{compat.TRANSFORMERS_VERSION} can build{ocr_hint}. Point `{field}` at the LLM (e.g. a Qwen3 checkout)."
        )


def model_dir_arg(value: Any, what: str = "from_pretrained") -> Path:
    """The MEMModel directory ``from_pretrained`` was given, checked.

    Raises:
        InputTypeError: Not a str/PathLike (``None`` included).
        NotADirectoryError: A file.
        FileNotFoundError: Missing, or without ``config.json``.
    """
    if not isinstance(value, (str, os.PathLike)) or (isinstance(value, str) and not value):
        raise InputTypeError(
            f"{what}: `pretrained_model_name_or_path` is {value!r}; pass the path of a MEMModel directory (str or Path), "
            "e.g. one written by `python -m ocrmem.tiny DIR` or by save_pretrained."
        )
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what}: {str(path)!r} is a file; pass the MEMModel directory that holds config.json.")
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: {str(path)!r} does not exist (no config.json) — not a MEMModel directory.")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: no config.json — not a MEMModel directory (write one with save_pretrained or `python -m ocrmem.tiny`)."
        )
    return path


def output_dir(value: Any, what: str) -> Path:
    """Create the directory ``what`` writes into, or say clearly why it cannot be one.

    Raises:
        InputTypeError: Not a str/PathLike.
        NotADirectoryError: ``value`` (or a parent) is a file.
    """
    if not isinstance(value, (str, os.PathLike)) or (isinstance(value, str) and not value):
        raise InputTypeError(f"{what}: the output directory is {value!r}; pass a directory path (str or Path).")
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what}: {str(path)!r} is a file, not a directory; pass a directory path (created if missing).")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise NotADirectoryError(
            f"{what}: cannot create directory {str(path)!r}: a parent is a file ({err.strerror}); pass a directory path."
        ) from err
    return path


def read_mem_config(model_dir: Path, overrides: dict[str, Any], known_fields: Iterable[str]) -> dict[str, Any]:
    """``model_dir/config.json`` as MEMConfig kwargs, with ``overrides`` applied.

    Raises:
        CheckpointError: Not a JSON object, or the config of another model type.
        ConfigError: An override that is no MEMConfig field (a typo would otherwise be kept silently).
    """
    import difflib

    config_file = model_dir / "config.json"
    config = read_json_object(config_file, "a MEMModel config")
    model_type = config.pop("model_type", "ocrmem")
    if model_type != "ocrmem":
        raise CheckpointError(
            f"{config_file} is a {model_type!r} config, not a MEMModel one (model_type 'ocrmem'): point from_pretrained "
            "at a directory written by MEMModel.save_pretrained or `python -m ocrmem.tiny`, not at the LLM or OCR "
            "checkpoint it refers to (those go in base_model_name / ocr_model_name)."
        )
    known = list(known_fields)
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(
                f"from_pretrained: `{key}` is not a MEMConfig field"
                + (f" — did you mean `{close[0]}`?" if close else f"; the fields are {', '.join(known)}.")
            )
    config.update(overrides)
    return config


__all__ = [
    "IGNORE_INDEX",
    "PIXEL_LIMIT",
    "check_finite",
    "check_llm_dir",
    "check_parts",
    "check_sequence_length",
    "literal_memory_token_message",
    "model_dir_arg",
    "output_dir",
    "read_json_object",
    "read_mem_config",
    "validate_inputs",
]
