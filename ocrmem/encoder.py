"""DeepEncoder, the OCR encoder of DeepSeek-OCR, written from scratch in plain torch.

This file holds, top to bottom:

1. ``DeepEncoderSpec`` — every size of the encoder, with the full DeepSeek-OCR and a tiny
   CPU preset.
2. SAM ViT-B (``sam_model``): 16-px patches, windowed attention with decomposed relative
   positions, a conv neck and the 16x token compressor (``net_2``, ``net_3``).
3. CLIP-L (``vision_model``): a pre-norm transformer with quick-GELU that takes SAM's
   compressed tokens as its patch embeddings.
4. ``DeepEncoder``: SAM + CLIP with one of two read-outs (see below), mapping pages
   (P, 3, S, S) to vision features (P, T, D).
5. Checkpoint I/O: ``load_deepencoder`` reads the vision side of a DeepSeek-OCR
   checkpoint directory (no ``trust_remote_code``, any transformers version);
   ``save_deepencoder`` writes one in the same layout.

Parameter names match the DeepSeek-OCR checkpoint: checkpoint key == ``"model." + name``.

Read-outs:
- ``"deepseek_ocr"`` is DeepSeek-OCR's own: CLIP sees [class token; SAM tokens]; the
  features concat(CLIP output without the class token, SAM tokens) go through
  ``projector.layers``; each row of the token grid ends with ``image_newline`` and the page
  ends with ``view_seperator`` (the checkpoint's spelling). T = h * (w + 1) + 1.
- ``"tokens_plus_clip"`` is the user's third-party encoder package: SAM tokens plus the CLIP
  position table (no class token) go through ``pre_layrnorm`` and the CLIP transformer,
  and the result is ``tokens + clip(tokens)``. T = h * w, D = clip_width.

Each read-out resamples CLIP's position table (for pages other than 1024 px) the way its
reference does: deepseek_ocr in fp32 with antialias, tokens_plus_clip in the table's dtype
without. Pixels: ``forward`` takes DeepSeek-OCR-normalised pages (mean = std = 0.5, what the
renderer produces) for both read-outs; ``pixel_norm="clip"`` re-normalises them to CLIP's
mean/std, as the user's package does to PIL images by default. Parity with the published code
and the package is pinned by tests/ocrmem/test_encoder_golden.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ocrmem.errors import CheckpointError, ConfigError
from ocrmem.fileio import atomic_write

logger = logging.getLogger(__name__)

Readout = Literal["deepseek_ocr", "tokens_plus_clip"]
READOUTS: tuple[str, ...] = ("deepseek_ocr", "tokens_plus_clip")

# Pixel normalisations as (mean, std) per RGB channel, applied to pixels in [0, 1].
# "deepseek_ocr": DeepSeek-OCR's ToTensor + Normalize(0.5, 0.5), what its encoder was trained on
# and what ocrmem's renderer produces (u8 / 127.5 - 1, in [-1, 1]); the default for both read-outs.
# "clip": CLIP's mean/std, what the user's encoder package applies to PIL images by default.
PIXEL_NORMS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "deepseek_ocr": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}
DEFAULT_PIXEL_NORM = "deepseek_ocr"

# Every vision-side checkpoint key starts with one of these (or is one of the two singletons).
CHECKPOINT_PREFIX = "model."
_VISION_PREFIXES = ("model.sam_model.", "model.vision_model.", "model.projector.")
_VISION_SINGLETONS = ("model.image_newline", "model.view_seperator")
# Checkpoint keys of the deepseek_ocr layout that the tokens_plus_clip read-out has no use for.
_DEEPSEEK_ONLY_PREFIXES = (
    "model.vision_model.embeddings.class_embedding",
    "model.vision_model.embeddings.patch_embedding.",
    "model.projector.",
    "model.image_newline",
    "model.view_seperator",
)
_SAM_BLOCKS = "model.sam_model.blocks."
_CLIP_LAYERS = "model.vision_model.transformer.layers."
_CONFIG_NAME = "config.json"
_WEIGHTS_NAME = "model.safetensors"
_INDEX_NAME = "model.safetensors.index.json"
_MAX_LISTED_KEYS = 10  # error messages list this many offending keys, then "and N more"
# safetensors dtype names of the floating dtypes a checkpoint may use.
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


# -----------------------------------------------------------------------------
# Spec


@dataclass
class DeepEncoderSpec:
    """Every size of a DeepEncoder. The defaults are DeepSeek-OCR's (``full()``).

    Raises:
        ConfigError: from ``__post_init__`` when a value is invalid; the message names the
            field, the value and the fix.
    """

    image_size: int = 1024  # DeepSeek-OCR "Base" mode; SAM's pos_embed grid is 1024/16 = 64 per side
    patch_size: int = 16  # SAM ViT-B patch; with the two stride-2 convs one token covers 64 px
    sam_width: int = 768  # ViT-B hidden size
    sam_depth: int = 12  # ViT-B depth
    sam_heads: int = 12  # head_dim 64, the width of rel_pos_h/w in the checkpoint
    sam_window: int = 14  # SAM's window: 14x14 tokens, rel_pos tables of 2*14-1 = 27 rows
    sam_global_layers: tuple[int, ...] = (2, 5, 8, 11)  # every third block attends globally (127 rows)
    sam_mlp_ratio: float = 4.0  # ViT-B MLP: 768 -> 3072 -> 768
    sam_out_chans: int = 256  # SAM neck output channels
    compressor_chans: tuple[int, ...] = (512, 1024)  # net_2, net_3: two stride-2 convs = 16x fewer tokens
    clip_width: int = 1024  # CLIP-L hidden; it takes net_3's channels as patch embeddings
    clip_layers: int = 24  # CLIP-L depth
    clip_heads: int = 16  # head_dim 64
    clip_intermediate: int = 4096  # CLIP-L MLP width
    clip_patch: int = 14  # CLIP-L/14 patch conv: kept so the checkpoint loads, unused in forward
    clip_positions: int = 257  # CLIP-L at 224 px: a 16x16 grid + the class token
    projector_in: int = 2048  # concat(CLIP output, SAM tokens) = 2 * clip_width
    projector_out: int = 1280  # hidden size of DeepSeek-OCR's 3B MoE decoder

    def __post_init__(self) -> None:
        # JSON gives lists; keep tuples so specs compare equal and hash.
        self.sam_global_layers = tuple(self.sam_global_layers)
        self.compressor_chans = tuple(self.compressor_chans)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("sam_global_layers", "compressor_chans"):
                continue
            if f.name == "sam_mlp_ratio":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
                if not ok:
                    raise ConfigError(
                        f"`sam_mlp_ratio` must be a positive number, got {value!r}; "
                        "DeepSeek-OCR uses 4.0."
                    )
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(
                    f"`{f.name}` must be a positive integer, got {value!r}; "
                    f"DeepSeek-OCR uses {f.default!r}."
                )
        stride = self.patch_size * 4
        if self.image_size % stride != 0:
            raise ConfigError(
                f"`image_size` must be a multiple of 4 * patch_size = {stride} (one token per "
                f"{stride} px after the two stride-2 convs), got {self.image_size}; "
                f"use e.g. {max(stride, self.image_size // stride * stride)}."
            )
        if self.sam_width % self.sam_heads != 0:
            raise ConfigError(
                f"`sam_heads` must divide `sam_width` = {self.sam_width}, got {self.sam_heads}; "
                "pick a head count that gives an integer head_dim (DeepSeek-OCR: 768 / 12 = 64)."
            )
        bad = [i for i in self.sam_global_layers if not isinstance(i, int) or not 0 <= i < self.sam_depth]
        if bad or len(set(self.sam_global_layers)) != len(self.sam_global_layers):
            raise ConfigError(
                f"`sam_global_layers` must hold distinct block indices in [0, sam_depth = "
                f"{self.sam_depth}), got {self.sam_global_layers!r}; DeepSeek-OCR uses (2, 5, 8, 11)."
            )
        if len(self.compressor_chans) != 2 or not all(
            isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in self.compressor_chans
        ):
            raise ConfigError(
                f"`compressor_chans` must be two positive integers (net_2, net_3 output channels), "
                f"got {self.compressor_chans!r}; DeepSeek-OCR uses (512, 1024)."
            )
        if self.clip_width != self.compressor_chans[-1]:
            raise ConfigError(
                f"`clip_width` must equal compressor_chans[-1] = {self.compressor_chans[-1]} because "
                f"CLIP takes net_3's channels as its patch embeddings, got {self.clip_width}; "
                "set both to the same value."
            )
        if self.clip_width % self.clip_heads != 0:
            raise ConfigError(
                f"`clip_heads` must divide `clip_width` = {self.clip_width}, got {self.clip_heads}; "
                "pick a head count that gives an integer head_dim (DeepSeek-OCR: 1024 / 16 = 64)."
            )
        grid = math.isqrt(self.clip_positions - 1)
        if self.clip_positions < 2 or grid * grid != self.clip_positions - 1:
            raise ConfigError(
                f"`clip_positions` must be a square grid plus one class token (g*g + 1), got "
                f"{self.clip_positions}; DeepSeek-OCR uses 16*16 + 1 = 257."
            )
        if self.projector_in != 2 * self.clip_width:
            raise ConfigError(
                f"`projector_in` must be 2 * clip_width = {2 * self.clip_width} (CLIP output "
                f"concatenated with SAM tokens), got {self.projector_in}; set it to {2 * self.clip_width}."
            )

    @property
    def sam_grid(self) -> int:
        """Patches per side at ``image_size`` (64 for DeepSeek-OCR)."""
        return self.image_size // self.patch_size

    @property
    def clip_grid(self) -> int:
        """Side of the grid part of CLIP's position table (16 for DeepSeek-OCR)."""
        return math.isqrt(self.clip_positions - 1)

    @classmethod
    def full(cls) -> DeepEncoderSpec:
        """DeepSeek-OCR's DeepEncoder (SAM ViT-B + CLIP-L + 2048 -> 1280 projector)."""
        return cls()

    @classmethod
    def tiny(cls) -> DeepEncoderSpec:
        """Same structure with small widths and depths, for CPU tests (256 px -> 4x4 tokens)."""
        return cls(
            image_size=256,
            sam_width=32,
            sam_depth=2,
            sam_heads=2,
            sam_window=4,
            sam_global_layers=(1,),
            sam_out_chans=16,
            compressor_chans=(32, 64),
            clip_width=64,
            clip_layers=2,
            clip_heads=2,
            clip_intermediate=128,
            clip_positions=17,  # (256 / 64)^2 + 1
            projector_in=128,
            projector_out=96,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        out = asdict(self)
        out["sam_global_layers"] = list(self.sam_global_layers)
        out["compressor_chans"] = list(self.compressor_chans)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeepEncoderSpec:
        """Inverse of ``to_dict``; missing fields take their defaults.

        Args:
            data: field name -> value, as written by ``to_dict``.

        Returns:
            The spec.

        Raises:
            ConfigError: on unknown fields or invalid values.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"Unknown DeepEncoderSpec field(s) {unknown}; the known fields are {sorted(known)}. "
                "Remove them or check the spelling."
            )
        return cls(**data)


def _check_readout(readout: str) -> None:
    if readout not in READOUTS:
        raise ConfigError(f"`readout` must be one of {READOUTS}, got {readout!r}.")


def _check_pixel_norm(pixel_norm: object) -> str:
    if not isinstance(pixel_norm, str) or pixel_norm not in PIXEL_NORMS:
        raise ConfigError(
            f"`pixel_norm` must be one of {tuple(PIXEL_NORMS)}, got {pixel_norm!r}; \"deepseek_ocr\" (mean = std = "
            "0.5) is what DeepSeek-OCR's encoder was trained with, \"clip\" reproduces the encoder package's "
            "own PIL preprocessing."
        )
    return pixel_norm


def normalize_pixels(pages: Tensor, pixel_norm: str = DEFAULT_PIXEL_NORM) -> Tensor:
    """Encoder input from uint8 pages, normalised as ``pixel_norm`` says.

    Args:
        pages: (P, 3, S, S) uint8 (a (P, 1, S, S) grey page is repeated to 3 channels).
        pixel_norm: a key of ``PIXEL_NORMS``.

    Returns:
        float32 (P, 3, S, S). For ``"deepseek_ocr"`` it is ``u8 / 127.5 - 1``, bit for bit
        DeepSeek-OCR's ``(u8 / 255 - 0.5) / 0.5`` (and the renderer's output); for ``"clip"``
        ``(u8 / 255 - mean) / std``.

    Raises:
        ConfigError: unknown ``pixel_norm``.
        ValueError: ``pages`` not uint8 of shape (P, 1 or 3, S, S).
    """
    _check_pixel_norm(pixel_norm)
    if pages.dtype != torch.uint8 or pages.ndim != 4 or pages.shape[1] not in (1, 3):
        raise ValueError(
            f"`pages` must be uint8 of shape (P, 3, S, S) or (P, 1, S, S), got {pages.dtype} {tuple(pages.shape)}; "
            "pass the rendered pages before normalisation."
        )
    pages = pages.expand(-1, 3, -1, -1)
    if pixel_norm == "deepseek_ocr":
        return pages.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in PIXEL_NORMS[pixel_norm])
    return (pages.to(torch.float32) / 255 - mean) / std


def _check_image_size(spec: DeepEncoderSpec, image_size: int) -> int:
    """Tokens per side for ``image_size``; raises ConfigError if it does not tile."""
    stride = spec.patch_size * 4
    if not isinstance(image_size, int) or image_size <= 0 or image_size % stride != 0:
        raise ConfigError(
            f"`image_size` must be a positive multiple of {stride} (one token per {stride} px), "
            f"got {image_size!r}; resize pages to e.g. 512, 640, 1024 or 1280."
        )
    return image_size // stride


# -----------------------------------------------------------------------------
# SAM ViT-B


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dim of a (B, C, H, W) map (SAM's neck)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)  # (B, 1, H, W)
        var = (x - mean).pow(2).mean(1, keepdim=True)  # (B, 1, H, W)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def window_partition(x: Tensor, window: int) -> tuple[Tensor, tuple[int, int]]:
    """Cut a token map into non-overlapping windows, zero-padding the bottom/right edge.

    Args:
        x: (B, H, W, C) token map.
        window: window side in tokens.

    Returns:
        ``(windows, (Hp, Wp))``: windows (B * nH * nW, window, window, C) and the padded size.
    """
    B, H, W, C = x.shape
    pad_h = (window - H % window) % window
    pad_w = (window - W % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # (B, Hp, Wp, C)
    Hp, Wp = H + pad_h, W + pad_w
    nh, nw = Hp // window, Wp // window
    x = x.view(B, nh, window, nw, window, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(B * nh * nw, window, window, C)
    return windows, (Hp, Wp)


def window_unpartition(windows: Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """Inverse of ``window_partition``: stitch windows back and crop the padding.

    Args:
        windows: (B * nH * nW, window, window, C).
        window: window side in tokens.
        padded_hw: (Hp, Wp) returned by ``window_partition``.
        hw: (H, W) before padding.

    Returns:
        (B, H, W, C) token map.
    """
    Hp, Wp = padded_hw
    H, W = hw
    nh, nw = Hp // window, Wp // window
    B = windows.shape[0] // (nh * nw)
    C = windows.shape[-1]
    x = windows.view(B, nh, nw, window, window, C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    if Hp > H or Wp > W:
        x = x[:, :H, :W, :].contiguous()
    return x


def get_rel_pos(q_size: int, k_size: int, rel_pos: Tensor) -> Tensor:
    """Relative position embedding of every (query, key) pair along one axis.

    The table has one row per relative offset. When the attended grid differs from the one
    the table was trained for (another image size), it is resampled linearly.

    Args:
        q_size: query positions along the axis.
        k_size: key positions along the axis.
        rel_pos: (L, head_dim) table.

    Returns:
        (q_size, k_size, head_dim) embeddings.
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    table = rel_pos
    if rel_pos.shape[0] != max_rel_dist:
        resampled = F.interpolate(
            rel_pos.float().t().unsqueeze(0),  # (1, head_dim, L)
            size=max_rel_dist,
            mode="linear",
        )  # (1, head_dim, max_rel_dist)
        table = resampled.squeeze(0).t().to(rel_pos.dtype)  # (max_rel_dist, head_dim)
    # Scale coordinates so that query and key grids of different sizes cover the same extent.
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    offsets = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)  # (q, k), >= 0
    return table[offsets.long()]


def decomposed_rel_pos_bias(
    q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, q_size: tuple[int, int], k_size: tuple[int, int]
) -> Tensor:
    """Attention bias of decomposed relative positions (MViTv2, as in SAM).

    bias[i, j] = q_i . Rh[row(i) - row(j)] + q_i . Rw[col(i) - col(j)], computed per axis
    and broadcast, so it costs O(N * (H + W)) dot products instead of O(N^2).

    Args:
        q: (B, q_h * q_w, head_dim) unscaled queries (B counts heads too).
        rel_pos_h: (Lh, head_dim) table for the row axis.
        rel_pos_w: (Lw, head_dim) table for the column axis.
        q_size: (q_h, q_w).
        k_size: (k_h, k_w).

    Returns:
        (B, q_h * q_w, k_h * k_w) additive bias.
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    Rh = get_rel_pos(q_h, k_h, rel_pos_h)  # (q_h, k_h, hd)
    Rw = get_rel_pos(q_w, k_w, rel_pos_w)  # (q_w, k_w, hd)
    B, _, hd = q.shape
    r_q = q.reshape(B, q_h, q_w, hd)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)  # (B, q_h, q_w, k_h)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)  # (B, q_h, q_w, k_w)
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (B, q_h, q_w, k_h, k_w)
    return bias.reshape(B, q_h * q_w, k_h * k_w)


class SamAttention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) token map with decomposed rel-pos bias."""

    def __init__(self, width: int, heads: int, rel_pos_size: int) -> None:
        """
        Args:
            width: channels C.
            heads: attention heads.
            rel_pos_size: tokens per side this block attends over at the spec's image size
                (the window, or the whole grid for global blocks); tables get 2*size-1 rows.
        """
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, self.head_dim))

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        N = H * W
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, N, hd)
        bias = decomposed_rel_pos_bias(
            q.reshape(B * self.heads, N, self.head_dim), self.rel_pos_h, self.rel_pos_w, (H, W), (H, W)
        ).view(B, self.heads, N, N)  # (B, nh, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, nh, N, hd)
        out = out.transpose(1, 2).reshape(B, H, W, C)
        return self.proj(out)


class SamMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(width, hidden)
        self.lin2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


class SamBlock(nn.Module):
    """Pre-norm ViT block; attends inside windows unless it is a global block."""

    def __init__(self, spec: DeepEncoderSpec, is_global: bool) -> None:
        super().__init__()
        self.window = 0 if is_global else spec.sam_window  # 0 = attend over the whole grid
        self.norm1 = nn.LayerNorm(spec.sam_width, eps=1e-6)
        self.attn = SamAttention(spec.sam_width, spec.sam_heads, spec.sam_grid if is_global else spec.sam_window)
        self.norm2 = nn.LayerNorm(spec.sam_width, eps=1e-6)
        self.mlp = SamMLP(spec.sam_width, int(spec.sam_width * spec.sam_mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x  # (B, H, W, C)
        x = self.norm1(x)
        if self.window > 0:
            H, W = x.shape[1], x.shape[2]
            x, padded_hw = window_partition(x, self.window)  # (B * nW, win, win, C)
            x = self.attn(x)
            x = window_unpartition(x, self.window, padded_hw, (H, W))  # (B, H, W, C)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class SamPatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, C, g, g) -> (B, g, g, C)


class SamEncoder(nn.Module):
    """SAM ViT-B image encoder + neck + the 16x conv compressor (``net_2``, ``net_3``)."""

    def __init__(self, spec: DeepEncoderSpec) -> None:
        super().__init__()
        g, W = spec.sam_grid, spec.sam_width
        c0, c1 = spec.compressor_chans
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, W))
        self.patch_embed = SamPatchEmbed(spec.patch_size, W)
        global_layers = set(spec.sam_global_layers)
        self.blocks = nn.ModuleList(SamBlock(spec, i in global_layers) for i in range(spec.sam_depth))
        out = spec.sam_out_chans
        self.neck = nn.Sequential(
            nn.Conv2d(W, out, kernel_size=1, bias=False),
            LayerNorm2d(out),
            nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out),
        )
        self.net_2 = nn.Conv2d(out, c0, kernel_size=3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(c0, c1, kernel_size=3, stride=2, padding=1, bias=False)

    def abs_pos(self, grid: int) -> Tensor:
        """SAM's absolute positions for a ``grid`` x ``grid`` patch map, (1, grid, grid, W)."""
        if self.pos_embed.shape[1] == grid:
            return self.pos_embed
        table = self.pos_embed.permute(0, 3, 1, 2).float()  # (1, W, g0, g0)
        table = F.interpolate(table, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
        return table.permute(0, 2, 3, 1).to(self.pos_embed.dtype)  # (1, grid, grid, W)

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x: (P, 3, S, S) pages.

        Returns:
            (P, c1, S/64, S/64) compressed feature map.
        """
        x = self.patch_embed(x)  # (P, g, g, W)
        x = x + self.abs_pos(x.shape[1])
        for block in self.blocks:
            x = block(x)
        x = self.neck(x.permute(0, 3, 1, 2))  # (P, out, g, g)
        x = self.net_2(x)  # (P, c0, g/2, g/2)
        return self.net_3(x)  # (P, c1, g/4, g/4)


# -----------------------------------------------------------------------------
# CLIP-L


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's GELU approximation."""
    return x * torch.sigmoid(1.702 * x)


class ClipAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.qkv_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv_proj(x).reshape(B, N, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, N, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hd)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))


class ClipMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class ClipLayer(nn.Module):
    def __init__(self, spec: DeepEncoderSpec) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(spec.clip_width, eps=1e-5)
        self.self_attn = ClipAttention(spec.clip_width, spec.clip_heads)
        self.layer_norm2 = nn.LayerNorm(spec.clip_width, eps=1e-5)
        self.mlp = ClipMLP(spec.clip_width, spec.clip_intermediate)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))  # (B, N, D)
        return x + self.mlp(self.layer_norm2(x))


class ClipTransformer(nn.Module):
    def __init__(self, spec: DeepEncoderSpec) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(spec) for _ in range(spec.clip_layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class ClipEmbeddings(nn.Module):
    """CLIP-L's embeddings as stored in the checkpoint (deepseek_ocr read-out)."""

    def __init__(self, spec: DeepEncoderSpec) -> None:
        super().__init__()
        D = spec.clip_width
        self.class_embedding = nn.Parameter(torch.zeros(D))
        # CLIP's own 14-px patch conv. DeepEncoder feeds SAM tokens instead, so forward never
        # calls it; it exists so the checkpoint loads strictly and saves back unchanged.
        self.patch_embedding = nn.Conv2d(3, D, kernel_size=spec.clip_patch, stride=spec.clip_patch, bias=False)
        self.position_embedding = nn.Embedding(spec.clip_positions, D)


class PositionTable(nn.Module):
    """A frozen copy of CLIP's position table, held as a buffer named ``weight``.

    The tokens_plus_clip read-out treats the table as a constant (the user's package does),
    so it is a buffer, not a parameter; keeping the name ``weight`` under
    ``embeddings.position_embedding`` keeps its state-dict key equal to the checkpoint key.
    """

    def __init__(self, positions: int, width: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(positions, width))


class ClipPositionsOnly(nn.Module):
    """CLIP embeddings for the tokens_plus_clip read-out: the position table only."""

    def __init__(self, spec: DeepEncoderSpec) -> None:
        super().__init__()
        self.position_embedding = PositionTable(spec.clip_positions, spec.clip_width)


class ClipVisionModel(nn.Module):
    """CLIP-L vision transformer taking SAM's compressed tokens as its patch embeddings."""

    def __init__(self, spec: DeepEncoderSpec, with_class_token: bool) -> None:
        """
        Args:
            spec: sizes.
            with_class_token: True for the deepseek_ocr read-out (class token, trainable
                embeddings, antialiased position resampling as DeepSeek-OCR does); False for
                tokens_plus_clip (no class token, position table as a buffer, plain bicubic
                resampling as the user's package does).
        """
        super().__init__()
        self.with_class_token = with_class_token
        self.embeddings: nn.Module = ClipEmbeddings(spec) if with_class_token else ClipPositionsOnly(spec)
        self.pre_layrnorm = nn.LayerNorm(spec.clip_width, eps=1e-5)  # sic: the checkpoint's spelling
        self.transformer = ClipTransformer(spec)

    def position_table(self) -> Tensor:
        """CLIP's position table (1 + g0*g0, D) in the module's compute dtype.

        The compute dtype is that of ``pre_layrnorm.weight``. An engine that casts only the
        parameters (DeepSpeed's bf16/fp16 modes) leaves the tokens_plus_clip table, a buffer,
        in fp32; following the parameters here keeps the forward in one dtype.
        """
        table = self.embeddings.position_embedding.weight
        dtype = self.pre_layrnorm.weight.dtype
        return table if table.dtype == dtype else table.to(dtype)

    def grid_positions(self, grid: int) -> Tensor:
        """Positions of a ``grid`` x ``grid`` token map, without the class token, (grid*grid, D).

        Resampled bicubically when ``grid`` differs from the table's grid, the way each
        read-out's reference does it: DeepSeek-OCR (deepseek_ocr) in fp32 with antialias, then
        cast back; the user's package (tokens_plus_clip) in the table's own dtype without
        antialias. In bf16 the two differ by about one bf16 step in half of the elements.
        """
        table = self.position_table()  # (1 + g0*g0, D)
        g0 = math.isqrt(table.shape[0] - 1)
        positions = table[1:]  # (g0*g0, D)
        if g0 == grid:
            return positions
        D = table.shape[1]
        positions = positions.reshape(1, g0, g0, D).permute(0, 3, 1, 2)  # (1, D, g0, g0)
        if self.with_class_token:
            positions = F.interpolate(
                positions.float(), size=(grid, grid), mode="bicubic", antialias=True, align_corners=False
            ).to(table.dtype)  # (1, D, grid, grid)
        else:
            positions = F.interpolate(
                positions, size=(grid, grid), mode="bicubic", antialias=False, align_corners=False
            )  # (1, D, grid, grid)
        return positions.permute(0, 2, 3, 1).reshape(grid * grid, D)

    def forward(self, patch_tokens: Tensor) -> Tensor:
        """
        Args:
            patch_tokens: (P, N, D) SAM tokens in row-major grid order, N a square.

        Returns:
            (P, N + 1, D) with the class token first (deepseek_ocr) or (P, N, D).
        """
        P, N, D = patch_tokens.shape
        grid = math.isqrt(N)
        x = patch_tokens + self.grid_positions(grid)  # (P, N, D)
        if self.with_class_token:
            table = self.embeddings.position_embedding.weight
            cls = self.embeddings.class_embedding + table[0]  # (D,)
            x = torch.cat([cls.expand(P, 1, D), x], dim=1)  # (P, N + 1, D)
        x = self.pre_layrnorm(x)
        return self.transformer(x)


class Projector(nn.Module):
    """DeepSeek-OCR's linear projector into the decoder's hidden size."""

    def __init__(self, spec: DeepEncoderSpec) -> None:
        super().__init__()
        self.layers = nn.Linear(spec.projector_in, spec.projector_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


# -----------------------------------------------------------------------------
# DeepEncoder


class DeepEncoder(nn.Module):
    """SAM ViT-B -> 16x conv compressor -> CLIP-L, with one of two read-outs.

    Attributes:
        spec: the sizes.
        readout: ``"deepseek_ocr"`` or ``"tokens_plus_clip"`` (see the module docstring).
    """

    def __init__(
        self,
        spec: DeepEncoderSpec | None = None,
        readout: Readout = "tokens_plus_clip",
        pixel_norm: str = DEFAULT_PIXEL_NORM,
    ) -> None:
        """
        Args:
            spec: sizes; ``DeepEncoderSpec.full()`` when None.
            readout: ``"tokens_plus_clip"`` (default, the user's package) or ``"deepseek_ocr"``.
            pixel_norm: the normalisation the encoder sees (a key of ``PIXEL_NORMS``).
                ``forward`` always takes DeepSeek-OCR-normalised pixels (the renderer's
                [-1, 1]); with ``"clip"`` it re-normalises them to CLIP's mean/std first, as
                the user's encoder package does to PIL images by default.

        Raises:
            ConfigError: if ``readout`` or ``pixel_norm`` is unknown.
        """
        super().__init__()
        spec = spec if spec is not None else DeepEncoderSpec.full()
        _check_readout(readout)
        self.spec = spec
        self.readout = readout
        self.pixel_norm = _check_pixel_norm(pixel_norm)
        self.sam_model = SamEncoder(spec)
        self.vision_model = ClipVisionModel(spec, with_class_token=readout == "deepseek_ocr")
        if readout == "deepseek_ocr":
            self.projector = Projector(spec)
            self.image_newline = nn.Parameter(torch.zeros(spec.projector_out))
            self.view_seperator = nn.Parameter(torch.zeros(spec.projector_out))  # sic: checkpoint spelling
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Random init for tests and from-scratch use; checkpoints overwrite all of it.

        Linear/conv/LayerNorm keep torch's defaults. Tables that SAM and CLIP zero-init (or
        init at std 1) get std 0.02 so that every path contributes in tests.
        """
        sam = self.sam_model
        nn.init.normal_(sam.pos_embed, std=0.02)
        for block in sam.blocks:
            nn.init.normal_(block.attn.rel_pos_h, std=0.02)
            nn.init.normal_(block.attn.rel_pos_w, std=0.02)
        embeddings = self.vision_model.embeddings
        nn.init.normal_(embeddings.position_embedding.weight, std=0.02)
        if self.readout == "deepseek_ocr":
            nn.init.normal_(embeddings.class_embedding, std=0.02)
            std = self.spec.projector_out**-0.5  # DeepSeek-OCR: randn / sqrt(n_embed)
            nn.init.normal_(self.image_newline, std=std)
            nn.init.normal_(self.view_seperator, std=std)

    @property
    def output_dim(self) -> int:
        """D of the output: projector_out (deepseek_ocr) or clip_width (tokens_plus_clip)."""
        return self.spec.projector_out if self.readout == "deepseek_ocr" else self.spec.clip_width

    def tokens_per_page(self, image_size: int | None = None) -> int:
        """T, the number of output tokens per page.

        Args:
            image_size: page side in px; the spec's ``image_size`` when None.

        Returns:
            (S/64)^2 for tokens_plus_clip; h * (w + 1) + 1 for deepseek_ocr.

        Raises:
            ConfigError: if ``image_size`` is not a positive multiple of 64.
        """
        side = _check_image_size(self.spec, self.spec.image_size if image_size is None else image_size)
        if self.readout == "deepseek_ocr":
            return side * (side + 1) + 1
        return side * side

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Encode pages.

        Args:
            pixel_values: (P, 3, S, S) pages normalised like DeepSeek-OCR (mean = std = 0.5,
                in [-1, 1]; ``normalize_pixels`` or the renderer), S a multiple of 64; cast to
                the encoder's device and dtype (after the re-normalisation ``pixel_norm`` asks for).

        Returns:
            (P, T, D) with T = ``tokens_per_page(S)`` and D = ``output_dim``.

        Raises:
            ValueError: if ``pixel_values`` is not (P, 3, S, S) with S a multiple of 64.
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or pixel_values.shape[2] != pixel_values.shape[3]:
            raise ValueError(
                f"DeepEncoder expects pixel_values of shape (pages, 3, S, S), got {tuple(pixel_values.shape)}; "
                "render square RGB pages."
            )
        P, S = pixel_values.shape[0], pixel_values.shape[-1]
        T = self.tokens_per_page(S)
        weight = self.sam_model.patch_embed.proj.weight
        if self.pixel_norm != "deepseek_ocr":
            mean, std = (
                torch.tensor(v, dtype=torch.float32, device=pixel_values.device).view(1, 3, 1, 1)
                for v in PIXEL_NORMS[self.pixel_norm]
            )
            pixel_values = ((pixel_values.float() + 1.0) * 0.5 - mean) / std  # [-1, 1] -> [0, 1] -> this norm
        pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
        if P == 0:
            # Reshapes below cannot infer sizes from zero elements; no pages, no features.
            return pixel_values.new_zeros(0, T, self.output_dim)

        features = self.sam_model(pixel_values)  # (P, C, h, w)
        _, C, h, w = features.shape
        sam_tokens = features.flatten(2).transpose(1, 2)  # (P, h*w, C)
        if self.readout == "tokens_plus_clip":
            return sam_tokens + self.vision_model(sam_tokens)  # (P, h*w, C)

        clip_out = self.vision_model(sam_tokens)  # (P, 1 + h*w, C)
        features = torch.cat([clip_out[:, 1:], sam_tokens], dim=-1)  # (P, h*w, 2C)
        embeds = self.projector(features)  # (P, h*w, D)
        D = embeds.shape[-1]
        embeds = embeds.view(P, h, w, D)
        newline = self.image_newline.to(embeds.dtype).expand(P, h, 1, D)
        embeds = torch.cat([embeds, newline], dim=2).reshape(P, h * (w + 1), D)  # one newline per row
        separator = self.view_seperator.to(embeds.dtype).expand(P, 1, D)
        return torch.cat([embeds, separator], dim=1)  # (P, h*(w+1) + 1, D)


# -----------------------------------------------------------------------------
# Checkpoint I/O


def _is_vision_key(key: str) -> bool:
    return key.startswith(_VISION_PREFIXES) or key in _VISION_SINGLETONS


def _expected_shapes(spec: DeepEncoderSpec, readout: str) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape of everything a ``DeepEncoder(spec, readout)`` loads."""
    with torch.device("meta"):
        encoder = DeepEncoder(spec, readout)  # type: ignore[arg-type]
    return {CHECKPOINT_PREFIX + k: tuple(v.shape) for k, v in encoder.state_dict().items()}


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return shown + (f" and {more} more" if more > 0 else "")


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _weight_files(path: Path) -> tuple[Path, list[Path], dict[str, Path] | None]:
    """The checkpoint directory, its safetensors files and, if indexed, key -> file."""
    if not path.exists():
        raise FileNotFoundError(
            f"No DeepEncoder checkpoint at {path}: the path does not exist. Pass the directory of a "
            "DeepSeek-OCR checkpoint (config.json + *.safetensors) or one written by save_deepencoder."
        )
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path} is not a .safetensors file; pass the checkpoint directory or its .safetensors file."
            )
        return path.parent, [path], None
    index_path = path / _INDEX_NAME
    if index_path.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"Could not read the index {index_path} ({exc}); it should be JSON with a `weight_map`. "
                "Fix or delete it (the loader then reads every *.safetensors file in the directory)."
            ) from exc
        key_to_file = {k: path / name for k, name in weight_map.items() if _is_vision_key(k)}
        files = sorted(set(key_to_file.values()))
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(
                f"The index {index_path} names weight files that do not exist: {_list_keys(absent)}. "
                "Re-download the checkpoint."
            )
        return path, files, key_to_file
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if not files:
        raise CheckpointError(
            f"No *.safetensors file in {path}. A DeepEncoder checkpoint is a directory with config.json "
            "and model weights in safetensors format; download DeepSeek-OCR or write one with save_deepencoder."
        )
    return path, files, None


def _read_config(directory: Path) -> dict[str, Any]:
    config_path = directory / _CONFIG_NAME
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"Could not parse {config_path} ({exc}); fix or delete it.") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object, got {type(config).__name__}.")
    return config


def _layer_indices(shapes: dict[str, tuple[int, ...]], prefix: str) -> list[int]:
    """Sorted layer numbers ``i`` of the keys ``prefix + "i." + ...``."""
    found = set()
    for key in shapes:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _check_layer_numbering(shapes: dict[str, tuple[int, ...]], where: Path) -> None:
    """Refuse a checkpoint whose SAM blocks or CLIP layers are not numbered 0..n-1 without gaps.

    A missing middle layer would otherwise shift every later one, or (with sizes inferred
    from the tensors) load as a shallower encoder.
    """
    for prefix, what in ((_SAM_BLOCKS, "SAM block"), (_CLIP_LAYERS, "CLIP layer")):
        found = _layer_indices(shapes, prefix)
        gaps = sorted(set(range(found[-1] + 1)) - set(found)) if found else []
        if gaps:
            raise CheckpointError(
                f"Checkpoint {where} has {what}s numbered {found[0]}..{found[-1]} but no key "
                f"{prefix}{gaps[0]}.* (missing {what} number(s) {gaps}). The checkpoint is incomplete; "
                "re-download or re-save it."
            )


def _check_known_layout(spec: DeepEncoderSpec, where: Path, readout: str) -> None:
    """Compare sizes inferred from the tensors with DeepSeek-OCR's; refuse any difference.

    Without ``ocrmem_encoder`` in config.json nothing states the sizes, so a checkpoint that
    lost every key of its last CLIP layer or SAM block would load as a shallower encoder.
    The only layout accepted without a stated spec is the published one.
    """
    known = DeepEncoderSpec.full()
    ignore = set() if readout == "deepseek_ocr" else {"projector_in", "projector_out"}
    diffs = [
        f"{f.name} = {getattr(spec, f.name)!r} (DeepSeek-OCR: {getattr(known, f.name)!r})"
        for f in fields(DeepEncoderSpec)
        if f.name not in ignore and getattr(spec, f.name) != getattr(known, f.name)
    ]
    if diffs:
        raise CheckpointError(
            f"Checkpoint {where} has no `ocrmem_encoder` entry in {_CONFIG_NAME}, and the sizes inferred from its "
            f"tensors differ from DeepSeek-OCR's: {'; '.join(diffs)}. If it is DeepSeek-OCR, it is incomplete "
            "(e.g. the last SAM block or CLIP layer is missing): re-download it. If it is a different encoder on "
            f"purpose, state its sizes: add \"ocrmem_encoder\": DeepEncoderSpec(...).to_dict() to {_CONFIG_NAME} "
            "(save_deepencoder writes it)."
        )


def _infer_spec(shapes: dict[str, tuple[int, ...]], where: Path, readout: str = "deepseek_ocr") -> DeepEncoderSpec:
    """Derive the sizes from checkpoint shapes (for DeepSeek-OCR's own checkpoint).

    CLIP's head count is not visible in any shape; it is taken as width / 64, true of CLIP-L
    and of DeepSeek-OCR. Tiny or custom checkpoints carry ``ocrmem_encoder`` in config.json.
    The projector's shape is read only for the read-out that uses it (deepseek_ocr), so a
    projector the tokens_plus_clip read-out never loads cannot make it fail.
    """
    needed = [
        "model.sam_model.pos_embed",
        "model.sam_model.patch_embed.proj.weight",
        "model.sam_model.blocks.0.attn.rel_pos_h",
        "model.sam_model.blocks.0.mlp.lin1.weight",
        "model.sam_model.neck.0.weight",
        "model.sam_model.net_2.weight",
        "model.sam_model.net_3.weight",
        "model.vision_model.embeddings.position_embedding.weight",
        "model.vision_model.transformer.layers.0.mlp.fc1.weight",
    ]
    missing = [k for k in needed if k not in shapes]
    if missing:
        raise CheckpointError(
            f"Cannot infer the encoder sizes from {where}: it has no `ocrmem_encoder` in config.json and lacks "
            f"{_list_keys(missing)}. Point at a DeepSeek-OCR checkpoint, or add `ocrmem_encoder` "
            "(DeepEncoderSpec.to_dict()) to config.json."
        )

    def indices(prefix: str) -> list[int]:
        return _layer_indices(shapes, prefix)

    _, grid, _, sam_width = shapes["model.sam_model.pos_embed"]
    patch = shapes["model.sam_model.patch_embed.proj.weight"][-1]
    blocks = indices("model.sam_model.blocks.")
    rel_rows = {i: shapes.get(f"model.sam_model.blocks.{i}.attn.rel_pos_h", (0, 0))[0] for i in blocks}
    global_layers = tuple(i for i in blocks if rel_rows[i] == 2 * grid - 1)
    window_rows = sorted({r for i, r in rel_rows.items() if i not in global_layers and r > 0})
    window = (window_rows[0] + 1) // 2 if window_rows else DeepEncoderSpec.sam_window
    head_dim = shapes["model.sam_model.blocks.0.attn.rel_pos_h"][1]
    clip_width = shapes["model.sam_model.net_3.weight"][0]
    projector = (DeepEncoderSpec.projector_out, 2 * clip_width)
    if readout == "deepseek_ocr":
        projector = shapes.get("model.projector.layers.weight", projector)
    patch_embedding = shapes.get("model.vision_model.embeddings.patch_embedding.weight")
    try:
        return DeepEncoderSpec(
            image_size=grid * patch,
            patch_size=patch,
            sam_width=sam_width,
            sam_depth=len(blocks),
            sam_heads=sam_width // head_dim,
            sam_window=window,
            sam_global_layers=global_layers,
            sam_mlp_ratio=shapes["model.sam_model.blocks.0.mlp.lin1.weight"][0] / sam_width,
            sam_out_chans=shapes["model.sam_model.neck.0.weight"][0],
            compressor_chans=(shapes["model.sam_model.net_2.weight"][0], clip_width),
            clip_width=clip_width,
            clip_layers=len(indices("model.vision_model.transformer.layers.")),
            clip_heads=max(1, clip_width // 64),
            clip_intermediate=shapes["model.vision_model.transformer.layers.0.mlp.fc1.weight"][0],
            clip_patch=patch_embedding[-1] if patch_embedding else DeepEncoderSpec.clip_patch,
            clip_positions=shapes["model.vision_model.embeddings.position_embedding.weight"][0],
            projector_in=projector[1],
            projector_out=projector[0],
        )
    except ConfigError as exc:
        raise CheckpointError(
            f"The shapes in {where} do not describe a valid DeepEncoder ({exc}). Add `ocrmem_encoder` "
            "(DeepEncoderSpec.to_dict()) to config.json or check that this is a DeepSeek-OCR checkpoint."
        ) from exc


def _log_ignored(found: set[str], expected: set[str], readout: str) -> None:
    """Say at info level which vision keys of the checkpoint are not loaded, and why."""
    extra = sorted(found - expected)
    post_layernorm = [k for k in extra if k.startswith("model.vision_model.post_layernorm.")]
    position_ids = [k for k in extra if k.endswith("embeddings.position_ids")]
    other_readout = [k for k in extra if k.startswith(_DEEPSEEK_ONLY_PREFIXES)]
    unknown = [k for k in extra if k not in set(post_layernorm) | set(position_ids) | set(other_readout)]
    if post_layernorm:
        logger.info("Ignoring %s: DeepSeek-OCR never uses CLIP's post_layernorm.", _list_keys(post_layernorm))
    if position_ids:
        logger.info("Ignoring %s: position ids are recomputed, not loaded.", _list_keys(position_ids))
    if other_readout:
        logger.info(
            "Not loading %d key(s) of DeepSeek-OCR's own read-out (class token, CLIP's patch conv, its projector "
            "into DeepSeek-OCR's decoder, image_newline/view_seperator), which the %s read-out does not use; "
            "this is not the trainable proj: %s.", len(other_readout), readout, _list_keys(other_readout))
    if unknown:
        logger.info("Ignoring %d unknown vision key(s): %s.", len(unknown), _list_keys(unknown))


def load_deepencoder(
    path: str | os.PathLike[str],
    readout: Readout = "tokens_plus_clip",
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    pixel_norm: str | None = None,
) -> DeepEncoder:
    """Load the vision side of a DeepSeek-OCR checkpoint directory into a DeepEncoder.

    Only vision keys are read (through ``safe_open``); language-model tensors in the same files
    are never loaded. The module is built on the ``meta`` device and its tensors are assigned
    from the checkpoint, so nothing is randomly initialised.

    Args:
        path: checkpoint directory (config.json + ``*.safetensors``, optionally
            ``model.safetensors.index.json``) or a single ``.safetensors`` file.
        readout: ``"tokens_plus_clip"`` or ``"deepseek_ocr"``.
        dtype: dtype of the loaded encoder; when None, the checkpoint's dtype of
            ``sam_model.patch_embed.proj.weight`` (bf16 for DeepSeek-OCR).
        device: where the tensors go.
        pixel_norm: the pixel normalisation (a key of ``PIXEL_NORMS``); when None,
            ``ocrmem_pixel_norm`` of config.json, else ``"deepseek_ocr"`` (mean = std = 0.5)
            for both read-outs. The choice is logged at INFO level and kept as
            ``encoder.pixel_norm``.

    Returns:
        The encoder in eval mode; parameters keep ``requires_grad=True`` (freeze them yourself).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointError: no safetensors file, an unreadable file (named), or keys missing or of
            the wrong shape (listed with expected and found shapes).
        ConfigError: if ``readout`` is unknown.
    """
    _check_readout(readout)
    directory, files, key_to_file = _weight_files(Path(path))
    config = _read_config(directory)
    if pixel_norm is None:
        pixel_norm = config.get("ocrmem_pixel_norm", DEFAULT_PIXEL_NORM)
        try:
            _check_pixel_norm(pixel_norm)
        except ConfigError as exc:
            raise CheckpointError(f"`ocrmem_pixel_norm` in {directory / _CONFIG_NAME} is invalid: {exc}") from exc
    _check_pixel_norm(pixel_norm)

    with ExitStack() as stack:
        handles: dict[Path, Any] = {}
        for file in files:
            try:
                handles[file] = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            except Exception as exc:  # safetensors raises its own error types; all mean "unreadable"
                raise CheckpointError(
                    f"Could not read safetensors file {file}: {exc}. The file is corrupt or truncated; "
                    "re-download or re-save it."
                ) from exc
        if key_to_file is None:
            key_to_file = {}
            for file, handle in handles.items():
                for key in handle.keys():
                    if not _is_vision_key(key):
                        continue
                    if key in key_to_file:
                        raise CheckpointError(
                            f"Key {key} is stored in both {key_to_file[key]} and {file}; remove the stale file "
                            f"or add a {_INDEX_NAME} saying which to use."
                        )
                    key_to_file[key] = file
        shapes: dict[str, tuple[int, ...]] = {}
        for key, file in key_to_file.items():
            try:
                shapes[key] = tuple(handles[file].get_slice(key).get_shape())
            except Exception as exc:
                raise CheckpointError(
                    f"{file} does not hold {key} although {_INDEX_NAME} says so ({exc}); re-download the checkpoint."
                ) from exc

        _check_layer_numbering(shapes, directory)
        if "ocrmem_encoder" in config:
            try:
                spec = DeepEncoderSpec.from_dict(config["ocrmem_encoder"])
            except (ConfigError, TypeError) as exc:
                raise CheckpointError(
                    f"`ocrmem_encoder` in {directory / _CONFIG_NAME} is invalid: {exc}"
                ) from exc
        else:
            spec = _infer_spec(shapes, directory, readout)
            _check_known_layout(spec, directory, readout)

        expected = _expected_shapes(spec, readout)
        # Layers beyond the stated depth would be ignored like unknown keys: say so instead.
        deeper = [
            k for k in shapes
            if k.startswith((_SAM_BLOCKS, _CLIP_LAYERS)) and k not in expected
            and not k.startswith(_DEEPSEEK_ONLY_PREFIXES)
        ]
        if deeper:
            raise CheckpointError(
                f"Checkpoint {directory} has layers the stated sizes do not use ({_list_keys(sorted(deeper))}): "
                f"`ocrmem_encoder` in {_CONFIG_NAME} says sam_depth={spec.sam_depth}, clip_layers={spec.clip_layers}. "
                "Fix `ocrmem_encoder` to match the weights."
            )
        missing = [k for k in expected if k not in shapes]
        wrong = [k for k in expected if k in shapes and shapes[k] != expected[k]]
        if missing or wrong:
            # Wrong shapes first: they usually say more (another size) than a run of missing keys.
            problems = [f"{k}: expected {_fmt_shape(expected[k])}, found {_fmt_shape(shapes[k])}" for k in wrong]
            problems += [f"missing {k} (expected {_fmt_shape(expected[k])})" for k in missing]
            shown = "\n  ".join(problems[:_MAX_LISTED_KEYS])
            more = len(problems) - _MAX_LISTED_KEYS
            raise CheckpointError(
                f"Checkpoint {directory} does not fit DeepEncoder(readout={readout!r}): {len(missing)} missing "
                f"key(s), {len(wrong)} of the wrong shape:\n  {shown}"
                + (f"\n  and {more} more" if more > 0 else "")
                + "\nCheck that this is a complete DeepSeek-OCR checkpoint (or one written by save_deepencoder) "
                "and that `ocrmem_encoder` in its config.json matches the weights."
            )
        _log_ignored(set(shapes), set(expected), readout)

        if dtype is None:
            dtype = handles[key_to_file["model.sam_model.patch_embed.proj.weight"]].get_slice(
                "model.sam_model.patch_embed.proj.weight"
            ).get_dtype()
            dtype = _SAFETENSORS_DTYPES.get(dtype, torch.float32)
        state: dict[str, Tensor] = {}
        for key in expected:
            file = key_to_file[key]
            try:
                tensor = handles[file].get_tensor(key)
            except Exception as exc:
                raise CheckpointError(f"Could not read {key} from {file} ({exc}); re-download or re-save it.") from exc
            if tensor.is_floating_point():
                tensor = tensor.to(device=device, dtype=dtype)
            else:
                tensor = tensor.to(device=device)
            state[key[len(CHECKPOINT_PREFIX):]] = tensor

    with torch.device("meta"):
        encoder = DeepEncoder(spec, readout, pixel_norm)  # type: ignore[arg-type]
    encoder.load_state_dict(state, strict=True, assign=True)
    mean, std = PIXEL_NORMS[pixel_norm]
    logger.info("DeepEncoder from %s: %s read-out, pixel normalisation %r (mean %s, std %s).",
                directory, readout, pixel_norm, mean, std)
    return encoder.eval()


def save_deepencoder(
    encoder: DeepEncoder, path: str | os.PathLike[str], extra_config: dict[str, Any] | None = None
) -> Path:
    """Write ``encoder`` as a DeepSeek-OCR-layout checkpoint directory.

    The directory gets ``config.json`` (``model_type`` "deepseek_vl_v2", ``ocrmem_encoder`` =
    the spec, plus ``extra_config``) and ``model.safetensors`` with every vision key of the
    deepseek_ocr layout, so either read-out can load it. An encoder with the tokens_plus_clip
    read-out lacks the class embedding, CLIP's patch conv, the projector, ``image_newline``
    and ``view_seperator``: those are filled with deterministic values (seeded normal, std
    0.02; zero biases) that mean nothing. Each file is written atomically.

    Args:
        encoder: the encoder to save (not on the ``meta`` device).
        path: the directory; created if needed.
        extra_config: more config.json entries (may not set ``ocrmem_encoder``).

    Returns:
        The directory.

    Raises:
        ConfigError: if ``extra_config`` sets ``ocrmem_encoder``.
        FileExistsError: if the directory holds other ``*.safetensors`` files (the loader
            would mix them with this one).
        ValueError: if the encoder is on the ``meta`` device.
    """
    directory = Path(path)
    extra_config = dict(extra_config or {})
    if "ocrmem_encoder" in extra_config:
        raise ConfigError("`extra_config` may not set `ocrmem_encoder`; save_deepencoder writes it from encoder.spec.")
    directory.mkdir(parents=True, exist_ok=True)
    others = sorted(str(p) for p in directory.glob("*.safetensors") if p.name != _WEIGHTS_NAME)
    if others or (directory / _INDEX_NAME).exists():
        raise FileExistsError(
            f"{directory} already holds other weights ({_list_keys(others) or _INDEX_NAME}); "
            "save the encoder into an empty or new directory."
        )

    tensors: dict[str, Tensor] = {}
    for name, value in encoder.state_dict().items():
        if value.is_meta:
            raise ValueError(f"Cannot save {name}: the encoder is on the meta device; load or materialise it first.")
        tensors[CHECKPOINT_PREFIX + name] = value.detach().to("cpu").contiguous()
    reference = tensors["model.sam_model.patch_embed.proj.weight"].dtype
    generator = torch.Generator().manual_seed(0)
    for key, shape in _expected_shapes(encoder.spec, "deepseek_ocr").items():
        if key in tensors:
            continue
        if key.endswith("bias"):
            filler = torch.zeros(shape)
        else:
            filler = torch.randn(shape, generator=generator) * 0.02
        tensors[key] = filler.to(reference)

    config: dict[str, Any] = {"model_type": "deepseek_vl_v2"}
    config.update(extra_config)
    config["ocrmem_encoder"] = encoder.spec.to_dict()
    config["ocrmem_pixel_norm"] = encoder.pixel_norm

    atomic_write(directory / _WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write(directory / _CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return directory


__all__ = [
    "DeepEncoder",
    "DeepEncoderSpec",
    "READOUTS",
    "Readout",
    "decomposed_rel_pos_bias",
    "get_rel_pos",
    "DEFAULT_PIXEL_NORM",
    "PIXEL_NORMS",
    "load_deepencoder",
    "normalize_pixels",
    "save_deepencoder",
    "window_partition",
    "window_unpartition",
]
