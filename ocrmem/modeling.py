"""MEMModel: OCR memory for a frozen LLM — the reference implementation.

Data flow (only ``proj`` learns)::

    history text ──render──▶ pages ──ocr_embed (frozen, no_grad)──▶ features (P, T, V)
    features ──proj (trainable)──▶ vision embeds (P, T, H)
    input_ids with memory tokens ──embed (frozen)──▶ text embeds (B, L, H)
    vision embeds replace the memory-token positions ──▶ base_llm (frozen, carries grad) ──▶ loss

Two entry points, one merge:

* **fast path** — the collator (:mod:`ocrmem.data`) renders pages in DataLoader workers and the
  batch carries ``pixel_values`` plus ``input_ids`` holding ``T`` memory tokens per page.
* **seed path** — the user's interface ``model(input_ids, attention_mask, labels)``: the model
  finds each row's history, decodes and renders it, and rebuilds a fast-path batch itself
  (:meth:`MEMModel.compress_history`).

Why the encoder runs under ``no_grad``: nothing trainable lies upstream of a frozen encoder,
so its output can never carry gradient anywhere; tracking it only stores activations. This is
*not* what broke the user's training (see ``seed-notes.md``): their loss lost its ``grad_fn``
on batches where no row was long enough to be compressed, so ``proj`` never ran.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from . import compat
from .configuration import MEMConfig
from .encoder import DeepEncoder, load_deepencoder
from .errors import (
    CheckpointError,
    ConfigError,
    EmptyMemoryError,
    EmptyMemoryWarning,
    FreshProjectorWarning,
    InputError,
    InputTypeError,
    RemoteCodeError,
)
from .fileio import atomic_write as _atomic_write
from .projector import build_projector
from .rendering import PageRenderer, pixel_values_from_text
from .validation import (
    IGNORE_INDEX,
    check_finite,
    check_llm_dir,
    check_parts,
    check_sequence_length,
    literal_memory_token_message,
    model_dir_arg,
    output_dir,
    read_mem_config,
    validate_inputs,
)

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS_NAME = "model.safetensors"
_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MEMOutput(ModelOutput):
    """What :meth:`MEMModel.forward` returns.

    Attributes:
        loss: Mean next-token cross-entropy over unmasked labels (``None`` without labels).
        logits: (B, L, vocab) over the merged sequence.
        labels: (B, L) the labels actually used (history part masked), or ``None``.
        attention_mask: (B, L) of the merged sequence.
        num_pages: Pages encoded in this batch.
        memory_used: Whether ``proj`` took part (False = a batch without compressed history).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    num_pages: int | None = None
    memory_used: bool | None = None


def resolve_model_path(name: str, field: str, base_dir: str | os.PathLike | None = None) -> Path:
    """Turn ``base_model_name`` / ``ocr_model_name`` into an existing local directory.

    Relative names are tried against ``base_dir`` (the MEMModel directory being loaded) first,
    then the working directory — so a saved MEMModel dir can refer to ``"llm"`` beside it.

    Raises:
        ConfigError: ``name`` is empty.
        FileNotFoundError: No such directory; the message names the field and every path tried.
    """
    if not name:
        raise ConfigError(
            f"`{field}` is empty; set it to a local model directory, e.g. "
            f"MEMConfig({field}='/models/{'Qwen3-8B' if field == 'base_model_name' else 'DeepSeek-OCR'}')."
        )
    candidates = [Path(name).expanduser()]
    if base_dir is not None and not Path(name).is_absolute():
        candidates.insert(0, Path(base_dir) / name)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"`{field}` = {name!r}: no such directory (tried {tried}). Models are never downloaded; "
        f"point `{field}` at a local checkout."
    )


def split_history_ids(row_ids: list[int], marker_ids: list[int], context_threshold: int) -> tuple[list[int], list[int], int]:
    """The seed path's history split of one row, as ``(history, recent, recent_start)``.

    With ``marker_ids`` (the assistant marker) in the row: history = everything before its last
    occurrence. Without it: the last ``context_threshold`` tokens stay text and anything older is
    history. History is compressed only when longer than ``context_threshold``; otherwise it is
    returned empty and the whole row stays text. Shared by :meth:`MEMModel.split_history` and the
    chat-data collator (:mod:`ocrmem.chat_data`), so both paths split a chat the same way.
    """
    start = None
    for i in range(len(row_ids) - len(marker_ids), -1, -1):
        if row_ids[i : i + len(marker_ids)] == marker_ids:
            start = i
            break
    if start is None:
        start = max(0, len(row_ids) - context_threshold)
    if start <= context_threshold:
        return [], row_ids, 0
    return row_ids[:start], row_ids[start:], start


def set_trainable_params(model: nn.Module, prefixes: list[str]) -> int:
    """Freeze every parameter, then unfreeze those whose name starts with one of ``prefixes``.

    Returns:
        The number of trainable parameters.

    Raises:
        ConfigError: A prefix matches no parameter (a typo would otherwise train nothing).
    """
    matched = {prefix: False for prefix in prefixes}
    trainable = 0
    for name, param in model.named_parameters():
        hit = [p for p in prefixes if name == p or name.startswith(p + ".")]
        param.requires_grad_(bool(hit))
        for prefix in hit:
            matched[prefix] = True
        if hit:
            trainable += param.numel()
    missing = [p for p, ok in matched.items() if not ok]
    if missing:
        raise ConfigError(
            f"`extra_trainable` prefixes {missing} match no parameter of the model; "
            "use names from model.named_parameters(), e.g. 'ocr_embed.vision_model.transformer.layers.0'."
        )
    return trainable


class MEMModel(PreTrainedModel):
    """Frozen OCR encoder + trainable ``proj`` + frozen LLM.

    Args:
        config: A :class:`MEMConfig` naming two local directories.
        base_llm: A ready causal LM to use instead of loading ``config.base_model_name``
            (used for meta-device tables and tests).
        ocr_embed: A ready :class:`~ocrmem.encoder.DeepEncoder` instead of loading
            ``config.ocr_model_name``.
        tokenizer: The LLM's tokenizer; loaded from ``base_model_name`` when not given.
            Without one, only the fast path works.
        model_dir: Directory that relative model names are resolved against.

    Raises:
        ConfigError: (a ``ValueError``) a model name is empty, ``proj``'s input width
            (``vision_embedding_size``) differs from the encoder's output width, or
            ``base_model_name`` holds no causal LM (the OCR dir, say).
        FileNotFoundError: A model directory does not exist.
        RemoteCodeError: The LLM directory asks to run custom code (``auto_map``): never run.
        CheckpointError: The encoder's weights hold NaN/inf.
        InputTypeError: A ready part of the wrong type.
    """

    config_class = MEMConfig
    base_model_prefix = "mem"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules: list[str] = []

    def __init__(
        self,
        config: MEMConfig,
        *,
        base_llm: nn.Module | None = None,
        ocr_embed: DeepEncoder | None = None,
        tokenizer: Any | None = None,
        model_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(config)
        check_parts(base_llm, ocr_embed, tokenizer)
        dtype = _DTYPES[config.compute_dtype]
        llm_path = None
        if base_llm is None:
            llm_path = resolve_model_path(config.base_model_name, "base_model_name", model_dir)
        if ocr_embed is None:
            ocr_path = resolve_model_path(config.ocr_model_name, "ocr_model_name", model_dir)
        # Where each model dir was found, so save_pretrained can write paths that load anywhere.
        self._source_dirs: dict[str, tuple[str, Path]] = {}
        if base_llm is None:
            check_llm_dir(llm_path)
            base_llm = compat.load_causal_lm(str(llm_path), dtype=dtype)
            self._source_dirs["base_model_name"] = (config.base_model_name, llm_path.resolve())
        if ocr_embed is None:
            ocr_embed = load_deepencoder(ocr_path, readout=config.encoder_readout, dtype=dtype)
            check_finite(ocr_embed.named_parameters(prefix="ocr_embed"), f"the OCR encoder in {ocr_path}")
            self._source_dirs["ocr_model_name"] = (config.ocr_model_name, ocr_path.resolve())
        if tokenizer is None and llm_path is not None:
            tokenizer = compat.load_tokenizer(str(llm_path))

        encoder_width = ocr_embed.output_dim
        proj_in = config.vision_embedding_size or encoder_width
        if proj_in != encoder_width:
            raise ConfigError(
                f"`vision_embedding_size` is {proj_in} but the OCR encoder ({config.encoder_readout} read-out) "
                f"emits {encoder_width}-d features: proj's input width must equal the encoder's output width. "
                f"Set vision_embedding_size={encoder_width} (or leave it None)."
            )
        hidden_size = base_llm.get_input_embeddings().embedding_dim

        self.ocr_embed = ocr_embed
        self.proj = build_projector(config.projector_type, proj_in, hidden_size)
        self.base_llm = base_llm
        self.tokenizer = tokenizer
        self._renderer: PageRenderer | None = None
        set_trainable_params(self, ["proj", *config.extra_trainable])
        self._frozen_to_eval()

    # ------------------------------------------------------------------ components

    @property
    def tokens_per_page(self) -> int:
        return self.ocr_embed.tokens_per_page()

    @property
    def page_size(self) -> int:
        return self.ocr_embed.spec.image_size

    @property
    def renderer(self) -> PageRenderer:
        """The renderer the seed path uses (built lazily: fonts are only needed to render)."""
        if self._renderer is None:
            self._renderer = PageRenderer(
                page_size=self.page_size, font_path=self.config.font_path, font_size=self.config.font_size
            )
        return self._renderer

    @property
    def memory_token_id(self) -> int:
        if self.tokenizer is None and self.config.memory_token_id is not None:
            return int(self.config.memory_token_id)
        tokenizer = self._require_tokenizer("memory_token")
        token_id = tokenizer.convert_tokens_to_ids(self.config.memory_token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ConfigError(
                f"`memory_token` is {self.config.memory_token!r}, which the tokenizer does not know; "
                "use one of its special tokens (Qwen has '<|image_pad|>')."
            )
        return int(token_id)

    def _require_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise ConfigError(f"{what} needs the LLM's tokenizer; pass `tokenizer=` or set `base_model_name`.")
        return self.tokenizer

    def encoder_is_tracked(self, pixel_values: torch.Tensor | None = None) -> bool:
        """Whether the encoder must run with grad: it has trainable parameters, or the caller
        explicitly asked for input gradients (``pixel_values.requires_grad``)."""
        if pixel_values is not None and pixel_values.requires_grad:
            return True
        return any(p.requires_grad for p in self.ocr_embed.parameters())

    def _frozen_to_eval(self) -> None:
        # Frozen parts stay in eval(): dropout off, deterministic features. Gradient flow does not
        # depend on the mode (the user's notes claimed otherwise; it is false).
        # Exception: HF checkpoints a layer only when it is in train mode, so with activation
        # checkpointing on, the LLM follows the model's mode (Qwen's dropout is 0 anyway).
        for module in (self.ocr_embed, self.base_llm):
            if module is self.base_llm and compat.is_activation_checkpointing(module):
                continue
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()

    def train(self, mode: bool = True) -> "MEMModel":
        super().train(mode)
        if mode:
            self._frozen_to_eval()
        return self

    # ------------------------------------------------------------------ checkpointing

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **_: Any) -> None:
        """Checkpoint the LLM's layers. Non-reentrant by default: reentrant checkpointing drops
        gradients whenever a layer's inputs do not require grad (any batch without memory)."""
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        compat.enable_activation_checkpointing(self.base_llm, use_reentrant=kwargs["use_reentrant"])
        self.base_llm.train(self.training)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """transformers < 5 name of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs)

    def activation_checkpointing_disable(self) -> None:
        compat.disable_activation_checkpointing(self.base_llm)
        self._frozen_to_eval()

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return compat.is_activation_checkpointing(self.base_llm)

    is_gradient_checkpointing = is_activation_checkpointing

    # ------------------------------------------------------------------ seed path

    def _marker_ids(self) -> list[int]:
        tokenizer = self._require_tokenizer("the seed path")
        return list(tokenizer(self.config.assistant_marker, add_special_tokens=False)["input_ids"])

    def split_history(self, row_ids: list[int]) -> tuple[list[int], list[int], int]:
        """Split one row (padding removed) into ``(history, recent, recent_start)``.

        With the marker: history = everything before its last occurrence. Without it: the last
        ``context_threshold`` tokens stay as text and anything older is history. History is
        compressed only when longer than ``context_threshold``; otherwise it is returned empty.
        """
        return split_history_ids(row_ids, self._marker_ids(), self.config.context_threshold)

    def compress_history(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Seed path → fast path: render each row's long history and replace it by memory tokens.

        Args:
            input_ids: (B, L) token ids, left- or right-padded.
            attention_mask: (B, L) 1 for real tokens; ``None`` = all real.
            labels: (B, L) or ``None``.

        Returns:
            A left-padded fast-path batch: ``input_ids`` (B, L'), ``attention_mask``,
            ``labels`` (history part and memory tokens masked with -100) and
            ``pixel_values`` (P, 3, S, S), P = pages of all rows in row order.
        """
        tokenizer = self._require_tokenizer("the seed path")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mem_id = self.memory_token_id
        rows_ids, rows_labels, pages = [], [], []
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool()
            ids = input_ids[b][keep].tolist()
            row_labels = labels[b][keep].tolist() if labels is not None else [IGNORE_INDEX] * len(ids)
            history, recent, start = self.split_history(ids)
            n_mem = 0
            if history:
                text = tokenizer.decode(history, skip_special_tokens=False)
                row_pages = pixel_values_from_text(self.renderer, text, self.config.max_pages)  # (p, 3, S, S)
                n_mem = row_pages.shape[0] * self.tokens_per_page
                pages.append(row_pages)
            rows_ids.append([mem_id] * n_mem + recent)
            rows_labels.append([IGNORE_INDEX] * n_mem + row_labels[start:])
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        batch = left_pad(rows_ids, rows_labels, pad_id, device=input_ids.device)
        pixel_values = torch.cat(pages) if pages else None
        batch["pixel_values"] = pixel_values.to(input_ids.device) if pixel_values is not None and len(pixel_values) else None
        if labels is None:
            batch.pop("labels")
        return batch

    # ------------------------------------------------------------------ forward

    def embed_pages(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode pages and project them: (P, 3, S, S) → (P, T, H)."""
        tracked = self.encoder_is_tracked(pixel_values) and torch.is_grad_enabled()
        # A frozen encoder with nothing trainable upstream runs untracked: its output could never
        # carry gradient, tracking it would only store activations for backward.
        with torch.set_grad_enabled(tracked):
            features = self.ocr_embed(pixel_values)  # (P, T, V)
        proj_dtype = next(self.proj.parameters()).dtype
        return self.proj(features.to(proj_dtype))  # (P, T, H)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> MEMOutput:
        """Run the model on a fast-path batch (``pixel_values`` given, or memory tokens present)
        or a seed-path batch (``input_ids`` only: the model compresses history itself).

        Raises:
            InputError / InputTypeError: A bad argument (shape, dtype, range, a token id outside the
                vocabulary, pages of another size, 0..255 or non-finite pixels, a sequence longer
                than the LLM's ``max_position_embeddings``) — see :func:`validate_inputs`.
            ConfigError: A config value set wrong after construction.
            InputError: The number of memory tokens does not match the encoded pages (for
                instance chat text holding the memory token ``<|image_pad|>`` literally).
            EmptyMemoryError: No row has memory and ``empty_memory_policy`` is ``"error"``.
        """
        self.config._validate()  # catches `model.config.context_threshold = -5` set after construction
        vocab_size = self.base_llm.get_input_embeddings().num_embeddings
        validate_inputs(input_ids, attention_mask, labels, pixel_values, position_ids, vocab_size, self.page_size)
        has_tokenizer = self.tokenizer is not None
        mem_id = self.memory_token_id if has_tokenizer or self.config.memory_token_id is not None else None
        has_mem_tokens = mem_id is not None and bool((input_ids == mem_id).any())
        if pixel_values is None and has_mem_tokens:
            raise InputError(literal_memory_token_message(self.config.memory_token, mem_id, int((input_ids == mem_id).sum())))
        if pixel_values is None and has_tokenizer:
            batch = self.compress_history(input_ids, attention_mask, labels)
            input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
            labels, pixel_values, position_ids = batch.get("labels"), batch["pixel_values"], None
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            # Positions count real tokens only, so a left-padded row sees the same positions as unpadded.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        check_sequence_length(self.base_llm, input_ids, position_ids, pixel_values, self.tokens_per_page)

        embed = self.base_llm.get_input_embeddings()
        inputs_embeds = embed(input_ids)  # (B, L, H)
        num_pages = 0 if pixel_values is None else int(pixel_values.shape[0])
        memory_mask = input_ids == mem_id if mem_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        n_tokens = int(memory_mask.sum())
        if num_pages:
            vision_embeds = self.embed_pages(pixel_values)  # (P, T, H)
            n_features = vision_embeds.shape[0] * vision_embeds.shape[1]
            if n_tokens != n_features:
                raise InputError(
                    "Memory features and memory tokens do not match: "
                    f"tokens: {n_tokens}, features: {n_features} ({num_pages} pages x {vision_embeds.shape[1]}). "
                    f"`input_ids` must hold exactly {vision_embeds.shape[1]} {self.config.memory_token!r} tokens per "
                    "page of `pixel_values` (MemoryCollator lays them out)"
                    + (
                        f"; the extra {n_tokens - n_features} may come from text that contains {self.config.memory_token!r} "
                        "literally: remove or replace it before tokenising."
                        if n_tokens > n_features
                        else "."
                    )
                )
            vision_embeds = vision_embeds.to(inputs_embeds.device, inputs_embeds.dtype)
            mask = memory_mask.unsqueeze(-1).expand_as(inputs_embeds)
            inputs_embeds = inputs_embeds.masked_scatter(mask, vision_embeds.reshape(-1, vision_embeds.shape[-1]))
        elif n_tokens:
            raise InputError(literal_memory_token_message(self.config.memory_token, mem_id, n_tokens))
        zero_term = None
        skip_loss = labels is not None and torch.is_grad_enabled() and self.config.empty_memory_policy != "error"
        sharded = any(_is_sharded(p) for p in self.proj.parameters())
        if not num_pages and (skip_loss or sharded):
            # Before the LLM, where a batch with memory runs the encoder and proj: ZeRO-3 / FSDP
            # gather parameters module by module, in the same order on every rank (in eval too).
            zero_term = self._zero_memory_pass(inputs_embeds)
            if sharded:
                # ... and in backward: a batch with memory back-propagates through every LLM layer
                # to reach proj (gathering each layer's weights again), so this one must too.
                inputs_embeds = inputs_embeds + zero_term.to(inputs_embeds.dtype)
                zero_term = None

        llm_out = self.base_llm(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        logits = llm_out.logits  # (B, L, vocab)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
            if not num_pages and torch.is_grad_enabled():
                loss = self._empty_memory_loss(loss, zero_term)
        return MEMOutput(
            loss=loss,
            logits=logits,
            labels=labels,
            attention_mask=attention_mask,
            num_pages=num_pages,
            memory_used=bool(num_pages),
        )

    def _empty_memory_loss(self, loss: torch.Tensor, zero_term: torch.Tensor | None) -> torch.Tensor:
        """No row had memory, so ``proj`` took no part: skip explicitly, or raise."""
        message = (
            "no row of this batch has compressed history (each row's history is at most "
            f"`context_threshold`={self.config.context_threshold} tokens), so proj took no part"
        )
        if self.config.empty_memory_policy == "error":
            raise EmptyMemoryError(
                f"{message}. Lower `context_threshold`, filter such rows out, or set "
                "empty_memory_policy='skip' to train on through them."
            )
        warnings.warn(
            f"{message}: the step is skipped (trainable parameters get exactly zero gradient). "
            "Set empty_memory_policy='error' to stop instead.",
            EmptyMemoryWarning,
            stacklevel=3,
        )
        return loss + zero_term.to(loss.dtype) if zero_term is not None else loss  # None: in the inputs already

    def _zero_memory_pass(self, like: torch.Tensor) -> torch.Tensor:
        """A zero-weighted pass through the memory modules, for a batch without memory.

        Every rank of a distributed run must run the same modules every step: DDP expects every
        trainable parameter in every rank's graph, and ZeRO-3 / FSDP gather a module's sharded
        parameters when it runs (a rank that skipped ``proj`` would issue other collectives than
        its peers: gloo "collective mismatch", NCCL a hang). So ``proj`` really runs, on zero
        features — and the encoder too, on one blank page, when its parameters are sharded.
        ``0 * output`` keeps the loss and makes every gradient exactly zero.
        Trainable parameters outside these modules (``extra_trainable`` in the LLM) took part in
        the loss already.
        """
        proj_param = next(self.proj.parameters())
        encoder_params = list(self.ocr_embed.parameters())
        if any(_is_sharded(p) for p in encoder_params):
            page = torch.zeros(1, 3, self.page_size, self.page_size, device=like.device, dtype=_param_dtype(encoder_params, proj_param))
            return self.embed_pages(page).float().sum() * 0.0  # (1, T, H) -> () exactly zero
        features = torch.zeros(1, 1, self.ocr_embed.output_dim, device=proj_param.device, dtype=proj_param.dtype)
        term = self.proj(features).float().sum() * 0.0  # (1, 1, H) -> ()
        # A trainable, unsharded encoder need not run on a blank page: its parameters only have to
        # be in the graph (DDP), which a zero-weighted element of each achieves.
        for p in encoder_params:
            if p.requires_grad and p.numel():
                term = term + p.reshape(-1)[0].float() * 0.0
        return term

    # ------------------------------------------------------------------ save / load

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights an adapter checkpoint holds: every trainable parameter."""
        return {n: p.detach().cpu().contiguous() for n, p in self.named_parameters() if p.requires_grad}

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        state_dict: dict[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
        **_: Any,
    ) -> None:
        """Write ``config.json`` and the trainable weights only (``proj`` by default), atomically.

        A frozen 8B LLM is never copied: the config refers to it by ``base_model_name``.
        """
        if not is_main_process:
            return
        out = output_dir(save_directory, "save_pretrained")
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        # Filter before copying: DeepSpeed/FSDP pass the full state dict (an 8B LLM) on every save.
        source = state_dict if state_dict is not None else dict(self.named_parameters())
        weights = {k: v.detach().cpu().contiguous() for k, v in source.items() if k in trainable}
        _atomic_write(out / ADAPTER_WEIGHTS_NAME, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
        config_text = self._portable_config(out).to_json_string(use_diff=False)
        _atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(config_text, encoding="utf-8"))

    def _portable_config(self, out: Path) -> MEMConfig:
        """The config to write into ``out``: model dirs named so the saved dir loads from anywhere.

        A dir this model was loaded from is written relative to ``out`` when it lies inside
        ``out`` (the tiny preset's ``"llm"``: the whole dir can be moved), else as an absolute
        path — never relative to some other directory, which would not resolve from ``out``.
        A name changed on ``config`` after construction is written as set.
        """
        config = copy.deepcopy(self.config)
        out = out.resolve()
        for field, (name_at_load, source) in getattr(self, "_source_dirs", {}).items():
            if getattr(config, field) != name_at_load:
                continue
            try:
                setattr(config, field, source.relative_to(out).as_posix())
            except ValueError:
                setattr(config, field, str(source))
        return config

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        base_llm: nn.Module | None = None,
        ocr_embed: DeepEncoder | None = None,
        tokenizer: Any | None = None,
        fresh_proj: bool = False,
        **config_overrides: Any,
    ) -> "MEMModel":
        """Load a MEMModel directory written by :meth:`save_pretrained`.

        Args:
            pretrained_model_name_or_path: The directory (``config.json`` + ``model.safetensors``).
            base_llm, ocr_embed, tokenizer: Ready parts to use instead of loading them.
            fresh_proj: Start ``proj`` from a fresh random initialisation instead of the saved
                adapter (warns with :class:`~ocrmem.errors.FreshProjectorWarning`). Needed to
                load a directory that has a config but no ``model.safetensors`` yet; without it,
                such a directory is an error, so a trained adapter is never silently replaced.
            **config_overrides: :class:`MEMConfig` fields to change (unknown names are an error).

        Raises:
            InputTypeError: The path is not a ``str``/``PathLike``.
            FileNotFoundError / NotADirectoryError: The directory, its config or a referenced
                model dir is missing, or the path is a file.
            CheckpointError: ``config.json`` is not a MEMModel config; the adapter weights are
                missing (without ``fresh_proj``), corrupt, non-finite or do not fit the model.
            RemoteCodeError: The LLM directory asks to run custom code.
            ConfigError: An unknown or invalid config value.
        """
        if not isinstance(fresh_proj, bool):
            raise InputTypeError(f"from_pretrained: `fresh_proj` is {fresh_proj!r}; pass True or False.")
        model_dir = model_dir_arg(pretrained_model_name_or_path)
        config = MEMConfig(**read_mem_config(model_dir, config_overrides, _config_fields()))
        weights_file = model_dir / ADAPTER_WEIGHTS_NAME
        if not fresh_proj and not weights_file.is_file():
            # Fail before loading an 8B LLM for nothing.
            what = "is a directory, not a file" if weights_file.is_dir() else "does not exist"
            raise CheckpointError(
                f"{weights_file} {what}: the trained adapter (proj) of this MEMModel directory is missing. "
                f"Point from_pretrained at a directory written by save_pretrained, or pass fresh_proj=True "
                "to start from a freshly initialised proj on purpose."
            )
        model = cls(config, base_llm=base_llm, ocr_embed=ocr_embed, tokenizer=tokenizer, model_dir=model_dir)
        if fresh_proj:
            found = f"{weights_file} is ignored" if weights_file.exists() else f"{model_dir} has no {ADAPTER_WEIGHTS_NAME}"
            warnings.warn(
                f"fresh_proj=True: proj starts from a fresh random initialisation ({found}).",
                FreshProjectorWarning,
                stacklevel=2,
            )
        else:
            model.load_adapter_weights(weights_file)
        return model

    def load_adapter_weights(self, path: str | os.PathLike) -> None:
        """Load trainable weights saved by :meth:`save_pretrained` (strict about names, shapes, finiteness)."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"adapter weights {str(path)!r} do not exist (or are not a file).")
        try:
            weights = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: cannot read adapter weights ({err}); the file is corrupt or truncated.") from err
        own = dict(self.named_parameters())
        unknown = sorted(set(weights) - set(own))
        wrong = [f"{k}: expected {tuple(own[k].shape)}, found {tuple(v.shape)}" for k, v in weights.items() if k in own and own[k].shape != v.shape]
        missing = sorted(k for k, p in own.items() if p.requires_grad and k not in weights)
        if unknown or wrong or missing:
            raise CheckpointError(
                f"{path} does not fit this model: unknown keys {unknown[:10]}, wrong shapes {wrong[:10]}, "
                f"missing trainable keys {missing[:10]}. Was it saved from a model with another "
                "projector_type / vision_embedding_size / base model?"
            )
        check_finite(weights.items(), str(path))
        with torch.no_grad():
            for key, value in weights.items():
                own[key].copy_(value)

    # ------------------------------------------------------------------ reports

    def parameter_counts(self) -> dict[str, tuple[int, int]]:
        """``{module: (trainable, total)}`` for ``base_llm``, ``ocr_embed``, ``proj``."""
        counts = {}
        for name in ("base_llm", "ocr_embed", "proj"):
            params = list(getattr(self, name).parameters())
            counts[name] = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
        return counts

    def parameter_report(self) -> str:
        """The user's own format, with the breakdown their notes used."""
        return format_parameter_report(self.parameter_counts())


def _config_fields() -> list[str]:
    """The keyword arguments MEMConfig defines itself (what from_pretrained may override)."""
    params = inspect.signature(MEMConfig.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]


def format_parameter_report(counts: dict[str, tuple[int, int]]) -> str:
    """``trainable params: N || all params: M || trainable%: P%`` plus a per-module breakdown."""
    from diagnostics.params import summary_line

    trainable = sum(t for t, _ in counts.values())
    total = sum(n for _, n in counts.values())
    lines = [summary_line(trainable, total), "Detailed breakdown:"]
    expect_zero = {"base_llm": "base_llm_model", "ocr_embed": "ocr_embed"}
    for name, (t, _) in counts.items():
        if name in expect_zero:
            lines.append(f"  {expect_zero[name]} trainable params: {t:,} (should be 0)")
        else:
            lines.append(f"  {name} trainable params: {t:,}")
    return "\n".join(lines)


def _is_sharded(param: torch.Tensor) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3 (``ds_id``) or FSDP (a ``DTensor`` / flat param)."""
    return hasattr(param, "ds_id") or type(param).__name__ in ("DTensor", "FlatParameter") or hasattr(param, "_fsdp_flattened")


def _param_dtype(params: list[torch.Tensor], fallback: torch.Tensor) -> torch.dtype:
    floating = [p.dtype for p in params if p.is_floating_point()]
    return floating[0] if floating else fallback.dtype


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100.

    A batch whose labels are all masked would give ``nan`` (0/0) in HF's loss; here it warns
    and returns a zero loss that is still attached to the graph, so training neither crashes
    nor records NaN.
    """
    shift_logits = logits[:, :-1, :].float()  # (B, L-1, V)
    shift_labels = labels[:, 1:].to(logits.device)  # (B, L-1)
    n_targets = int((shift_labels != IGNORE_INDEX).sum())
    if n_targets == 0:
        warnings.warn(
            "every label of this batch is masked (-100), so there is nothing to learn from it; "
            "the loss is 0 instead of NaN. Check the collator's label masking or the history split.",
            RuntimeWarning,
            stacklevel=3,
        )
        return shift_logits.sum() * 0.0
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def left_pad(
    rows_ids: list[list[int]], rows_labels: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Left-pad variable-length rows into ``input_ids``, ``attention_mask``, ``labels`` (B, L)."""
    length = max((len(r) for r in rows_ids), default=0)
    length = max(length, 1)
    batch = len(rows_ids)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, lab) in enumerate(zip(rows_ids, rows_labels)):
        if ids:
            input_ids[b, length - len(ids) :] = torch.tensor(ids)
            attention_mask[b, length - len(ids) :] = 1
            labels[b, length - len(lab) :] = torch.tensor(lab)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}


__all__ = [
    "ADAPTER_WEIGHTS_NAME",
    "IGNORE_INDEX",
    "MEMModel",
    "MEMOutput",
    "causal_lm_loss",
    "format_parameter_report",
    "left_pad",
    "resolve_model_path",
    "set_trainable_params",
    "split_history_ids",
]
