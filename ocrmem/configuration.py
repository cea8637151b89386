"""MEMConfig: everything needed to rebuild an OCR-memory model from a directory.

The config is deliberately *permissive*: ``MEMConfig()`` builds with empty model names and no
warning, because ``from_pretrained`` constructs an empty config first and fills it from
``config.json`` (the user's problem 2: a warning fired on every load). The model, not the
config, refuses empty names — see :class:`ocrmem.modeling.MEMModel`.

Values that are wrong whatever the model (a negative threshold, an unknown projector type) are
rejected here, with the field name, the value and the fix.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import PretrainedConfig

from .errors import ConfigError

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")
ENCODER_READOUTS = ("tokens_plus_clip", "deepseek_ocr")
EMPTY_MEMORY_POLICIES = ("skip", "error")


class MEMConfig(PretrainedConfig):
    """Configuration of :class:`~ocrmem.modeling.MEMModel`.

    Args:
        base_model_name: Local directory of the frozen causal LM (a Qwen checkpoint). Relative
            paths are resolved against the MEMModel directory first, then the working directory.
        ocr_model_name: Local directory of a DeepSeek-OCR checkpoint (or a tiny one with the
            same layout); only its vision keys are read.
        vision_embedding_size: Input width of ``proj``. ``None`` takes the encoder's output
            width. Kept because the user's training script sets it — to 512 against a 1024-d
            encoder, which :class:`MEMModel` rejects at construction.
        context_threshold: A row's history (everything before the last ``assistant_marker``) is
            rendered and compressed only when longer than this many tokens. In a row with no
            marker, the last ``context_threshold`` tokens stay text and anything older is history.
        encoder_readout: ``"tokens_plus_clip"`` (the user's encoder package: 1024-d, 256 tokens per
            1024-px page) or ``"deepseek_ocr"`` (DeepSeek-OCR's own read-out through its
            projector: 1280-d, with row newlines and a view separator).
        projector_type: ``"linear"`` or ``"mlp2x_gelu"`` (the user's ``Linear→GELU→Linear``).
        assistant_marker: Text that opens the answer being trained on; the history ends before
            its last occurrence.
        memory_token: Placeholder token whose positions receive the vision embeddings.
        memory_token_id: Its id, for models built without a tokenizer (seed-scale benchmarks);
            with a tokenizer, ``memory_token`` is looked up instead.
        max_pages: Most pages rendered per row; longer history keeps its *most recent* pages.
        font_path: Font for rendering; ``None`` picks a CJK-capable system font when there is one.
        font_size: Font size in pixels; ``None`` scales the Glyph recipe (9 pt at 1280 px).
        extra_trainable: Parameter-name prefixes trained besides ``proj`` (for example
            ``"ocr_embed.vision_model.transformer.layers.23"``). When one lies inside the
            encoder, the encoder runs with grad enabled and gradient crosses its frozen parts.
        empty_memory_policy: What a batch in which no row has compressed history does:
            ``"skip"`` returns the LLM loss plus a zero-weighted term on every trainable
            parameter (backward works, gradients are exactly zero, ``memory_used`` is False,
            a warning is logged) — ``"error"`` raises :class:`~ocrmem.errors.EmptyMemoryError`.
        compute_dtype: ``None`` (float32) or ``"bfloat16"``/``"float16"`` for the frozen parts.
    """

    model_type = "ocrmem"

    def __init__(
        self,
        base_model_name: str | None = "",
        ocr_model_name: str | None = "",
        vision_embedding_size: int | None = None,
        context_threshold: int = 2048,  # the user's value: shorter histories stay plain text
        encoder_readout: str = "tokens_plus_clip",  # what the user's encoder package returns
        projector_type: str = "mlp2x_gelu",  # the user's proj: Linear -> GELU -> Linear
        assistant_marker: str = "<|im_start|>assistant\n",  # Qwen chat template
        memory_token: str = "<|image_pad|>",  # an existing Qwen special token: no embedding resize
        memory_token_id: int | None = None,
        max_pages: int = 8,  # 8 x 256 tokens at 1024 px: ~2k vision tokens per row
        font_path: str | None = None,
        font_size: int | None = None,
        extra_trainable: list[str] | None = None,
        empty_memory_policy: str = "skip",  # never crash at step 37, never train silently on nothing
        compute_dtype: str | None = None,
        **kwargs: Any,
    ) -> None:
        # Path objects are welcome, but config.json holds strings.
        self.base_model_name = os.fspath(base_model_name) if isinstance(base_model_name, os.PathLike) else base_model_name or ""
        self.ocr_model_name = os.fspath(ocr_model_name) if isinstance(ocr_model_name, os.PathLike) else ocr_model_name or ""
        self.vision_embedding_size = vision_embedding_size
        self.context_threshold = context_threshold
        self.encoder_readout = encoder_readout
        self.projector_type = projector_type
        self.assistant_marker = assistant_marker
        self.memory_token = memory_token
        self.memory_token_id = memory_token_id
        self.max_pages = max_pages
        self.font_path = font_path
        self.font_size = font_size
        # Only a list/tuple is taken as a list: a bare string would become a list of its letters
        # (and a dict a list of its keys); anything else is kept as given for _validate to refuse.
        if extra_trainable is None:
            extra_trainable = []
        self.extra_trainable = list(extra_trainable) if isinstance(extra_trainable, (list, tuple)) else extra_trainable
        self.empty_memory_policy = empty_memory_policy
        self.compute_dtype = compute_dtype
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        """Check every field; :class:`MEMModel` calls this again in ``forward``, so a value set
        wrong after construction (``config.context_threshold = -5``) fails there too. (Not named ``validate``: transformers 5
        configs already have one.)

        Raises:
            ConfigError: naming the field, its value and the fix.
        """
        def fail(field: str, value: Any, fix: str) -> None:
            raise ConfigError(f"MEMConfig: `{field}` is {value!r} ({type(value).__name__}); {fix}")

        def is_int(value: Any) -> bool:  # bool is an int subclass, but context_threshold=True is a mistake
            return isinstance(value, int) and not isinstance(value, bool)

        for field in ("base_model_name", "ocr_model_name"):
            if not isinstance(getattr(self, field), str):
                fail(field, getattr(self, field), "use the path of a local model directory (a str).")
        if self.vision_embedding_size is not None and (
            not is_int(self.vision_embedding_size) or self.vision_embedding_size <= 0
        ):
            fail("vision_embedding_size", self.vision_embedding_size, "use a positive int or None (= the encoder's width).")
        if not is_int(self.context_threshold) or self.context_threshold < 0:
            fail("context_threshold", self.context_threshold, "use a non-negative int (tokens of history kept as text).")
        if self.encoder_readout not in ENCODER_READOUTS:
            fail("encoder_readout", self.encoder_readout, f"use one of {', '.join(ENCODER_READOUTS)}.")
        if self.projector_type not in PROJECTOR_TYPES:
            fail("projector_type", self.projector_type, f"use one of {', '.join(PROJECTOR_TYPES)}.")
        if not is_int(self.max_pages) or self.max_pages < 1:
            fail("max_pages", self.max_pages, "use a positive int.")
        if not isinstance(self.assistant_marker, str) or not self.assistant_marker:
            fail("assistant_marker", self.assistant_marker, "use the text that opens the assistant turn (a non-empty str).")
        if not isinstance(self.memory_token, str) or not self.memory_token:
            fail("memory_token", self.memory_token, "use a special token of the LLM's tokenizer (a non-empty str).")
        if self.memory_token_id is not None and (not is_int(self.memory_token_id) or self.memory_token_id < 0):
            fail("memory_token_id", self.memory_token_id, "use a non-negative int token id, or None to look `memory_token` up.")
        if self.font_path is not None and not isinstance(self.font_path, str):
            fail("font_path", self.font_path, "use the path of a .ttf/.ttc/.otf file (a str), or None.")
        if self.font_size is not None and (not is_int(self.font_size) or self.font_size < 1):
            fail("font_size", self.font_size, "use a positive int (pixels), or None.")
        if isinstance(self.extra_trainable, str):
            fail("extra_trainable", self.extra_trainable, f"use a list of parameter-name prefixes, e.g. [{self.extra_trainable!r}].")
        if not isinstance(self.extra_trainable, (list, tuple)) or not all(
            isinstance(p, str) and p for p in self.extra_trainable
        ):
            fail("extra_trainable", self.extra_trainable, "use a list of non-empty parameter-name prefixes (str), e.g. [].")
        if self.empty_memory_policy not in EMPTY_MEMORY_POLICIES:
            fail("empty_memory_policy", self.empty_memory_policy, f"use one of {', '.join(EMPTY_MEMORY_POLICIES)}.")
        if self.compute_dtype not in (None, "float32", "bfloat16", "float16"):
            fail("compute_dtype", self.compute_dtype, "use None, 'float32', 'bfloat16' or 'float16'.")

__all__ = ["ENCODER_READOUTS", "EMPTY_MEMORY_POLICIES", "MEMConfig", "PROJECTOR_TYPES"]
