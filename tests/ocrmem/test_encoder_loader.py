"""Tests for ocrmem.encoder's loader checks, buffer dtypes and pixel normalisation (issues 9 §2, 11).

- A checkpoint with a gap in its SAM block or CLIP layer numbering, or (without
  ``ocrmem_encoder`` in config.json) sizes that differ from DeepSeek-OCR's, is refused.
- The projector is checked only by the read-out that uses it.
- Every floating buffer follows ``.to(dtype)`` / ``.half()``, and a params-only cast (what
  DeepSpeed's bf16 mode does) does not break the forward.
- The pixel normalisation is configurable, defaults to DeepSeek-OCR's 0.5/0.5, and is said.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ocrmem.encoder as encoder_module
from ocrmem.encoder import DeepEncoder, DeepEncoderSpec, load_deepencoder, normalize_pixels, save_deepencoder
from ocrmem.errors import CheckpointError, ConfigError
from tests.ocrmem.test_encoder import KEYS_TSV, read_tsv

SIDE = 256  # DeepEncoderSpec.tiny().image_size


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny encoder written in the DeepSeek-OCR layout (both read-outs load it)."""
    torch.manual_seed(0)
    return save_deepencoder(DeepEncoder(DeepEncoderSpec.tiny(), "deepseek_ocr"), tmp_path_factory.mktemp("enc") / "ckpt")


def rewrite(src: Path, dst: Path, edit, config_edit=None) -> Path:
    """Copy a checkpoint dir, editing its tensors (dict -> dict) and config (dict -> dict)."""
    dst.mkdir(parents=True)
    tensors = edit(load_file(str(src / "model.safetensors")))
    save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    if config_edit is not None:
        config = config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def drop(prefix: str):
    return lambda t: {k: v for k, v in t.items() if not k.startswith(prefix)}


def no_spec(config: dict) -> dict:
    config.pop("ocrmem_encoder")
    return config


# -- layer numbering -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix,what",
    [("model.sam_model.blocks.0.", "SAM block"), ("model.vision_model.transformer.layers.0.", "CLIP layer")],
)
@pytest.mark.parametrize("with_spec", [True, False], ids=["spec", "inferred"])
def test_gap_in_layer_numbering_is_refused(tiny_ckpt: Path, tmp_path: Path, prefix: str, what: str, with_spec: bool) -> None:
    ckpt = rewrite(tiny_ckpt, tmp_path / "gap", drop(prefix), None if with_spec else no_spec)
    with pytest.raises(CheckpointError, match=re.escape(f"no key {prefix}* (missing {what} number(s) [0])")):
        load_deepencoder(ckpt, readout="tokens_plus_clip")


def test_layers_beyond_the_stated_depth_are_refused(tiny_ckpt: Path, tmp_path: Path) -> None:
    def add_layer(t: dict) -> dict:
        prefix = "model.vision_model.transformer.layers."
        t.update({k.replace(prefix + "1.", prefix + "2."): v.clone() for k, v in t.items() if k.startswith(prefix + "1.")})
        return t

    ckpt = rewrite(tiny_ckpt, tmp_path / "deeper", add_layer)
    with pytest.raises(CheckpointError, match=r"layers\.2\..*clip_layers=2.*Fix `ocrmem_encoder`"):
        load_deepencoder(ckpt, readout="deepseek_ocr")


# -- inferred sizes vs the known DeepSeek-OCR layout -----------------------------------------


def full_shapes() -> dict[str, tuple[int, ...]]:
    return read_tsv(KEYS_TSV)


def test_full_layout_infers_deepseek_ocr_sizes() -> None:
    for readout in ("deepseek_ocr", "tokens_plus_clip"):
        spec = encoder_module._infer_spec(full_shapes(), Path("ckpt"), readout)
        assert spec == DeepEncoderSpec.full()
        encoder_module._check_known_layout(spec, Path("ckpt"), readout)  # no error


@pytest.mark.parametrize(
    "prefix,field,found",
    [
        ("model.vision_model.transformer.layers.23.", "clip_layers", 23),
        ("model.sam_model.blocks.11.", "sam_depth", 11),
    ],
)
def test_checkpoint_missing_its_last_layer_is_refused_without_stated_sizes(prefix: str, field: str, found: int) -> None:
    """The real key list minus every key of the last CLIP layer / SAM block: numbering has no
    gap, so only the comparison with DeepSeek-OCR's layout can tell."""
    shapes = {k: v for k, v in full_shapes().items() if not k.startswith(prefix)}
    encoder_module._check_layer_numbering(shapes, Path("ckpt"))  # contiguous: passes
    spec = encoder_module._infer_spec(shapes, Path("ckpt"), "tokens_plus_clip")
    assert getattr(spec, field) == found
    with pytest.raises(CheckpointError, match=rf"{field} = {found} \(DeepSeek-OCR: {found + 1}\).*ocrmem_encoder"):
        encoder_module._check_known_layout(spec, Path("ckpt"), "tokens_plus_clip")


def test_tiny_checkpoint_without_stated_sizes_is_refused_by_the_loader(tiny_ckpt: Path, tmp_path: Path) -> None:
    ckpt = rewrite(tiny_ckpt, tmp_path / "nospec", lambda t: t, no_spec)
    with pytest.raises(CheckpointError, match=r"no `ocrmem_encoder`.*sam_width = 32 \(DeepSeek-OCR: 768\)"):
        load_deepencoder(ckpt, readout="tokens_plus_clip")
    load_deepencoder(tiny_ckpt, readout="tokens_plus_clip")  # the same weights with their sizes stated load


# -- the projector, per read-out -------------------------------------------------------------


def transpose_projector(t: dict) -> dict:
    t["model.projector.layers.weight"] = t["model.projector.layers.weight"].t().contiguous()
    return t


def test_transposed_projector_is_refused_only_by_the_readout_that_uses_it(tiny_ckpt: Path, tmp_path: Path) -> None:
    ckpt = rewrite(tiny_ckpt, tmp_path / "transposed", transpose_projector)
    load_deepencoder(ckpt, readout="tokens_plus_clip")  # never reads it
    with pytest.raises(CheckpointError, match=r"model\.projector\.layers\.weight: expected \(96, 128\), found \(128, 96\)"):
        load_deepencoder(ckpt, readout="deepseek_ocr")
    # Inferred sizes (the real layout): the same rule.
    shapes = full_shapes()
    shapes["model.projector.layers.weight"] = shapes["model.projector.layers.weight"][::-1]
    assert encoder_module._infer_spec(shapes, Path("ckpt"), "tokens_plus_clip") == DeepEncoderSpec.full()
    with pytest.raises(CheckpointError, match=r"projector_in"):
        encoder_module._infer_spec(shapes, Path("ckpt"), "deepseek_ocr")


def test_missing_projector_is_refused_only_by_the_readout_that_uses_it(tiny_ckpt: Path, tmp_path: Path) -> None:
    ckpt = rewrite(tiny_ckpt, tmp_path / "noproj", drop("model.projector."))
    load_deepencoder(ckpt, readout="tokens_plus_clip")
    with pytest.raises(CheckpointError, match=r"missing model\.projector\.layers\.weight \(expected \(96, 128\)\)"):
        load_deepencoder(ckpt, readout="deepseek_ocr")


# -- buffers follow the compute dtype (issue 9 §2) -------------------------------------------


@pytest.mark.parametrize("readout", ["deepseek_ocr", "tokens_plus_clip"])
@pytest.mark.parametrize("cast", ["to_bf16", "half"])
def test_every_floating_buffer_follows_the_module_cast(readout: str, cast: str) -> None:
    enc = DeepEncoder(DeepEncoderSpec.tiny(), readout)  # type: ignore[arg-type]
    buffers = dict(enc.named_buffers())
    if readout == "tokens_plus_clip":
        assert "vision_model.embeddings.position_embedding.weight" in buffers  # the table is a buffer
        assert "vision_model.embeddings.position_embedding.weight" in enc.state_dict()  # and persistent
    enc = enc.to(torch.bfloat16) if cast == "to_bf16" else enc.half()
    want = torch.bfloat16 if cast == "to_bf16" else torch.float16
    floating = {n: b.dtype for n, b in enc.named_buffers() if b.is_floating_point()}
    assert floating == {n: want for n in floating}
    assert {p.dtype for p in enc.parameters()} == {want}
    x = torch.rand(1, 3, 320, 320) * 2 - 1  # 320 px: positions get resampled (5x5 from 4x4)
    with torch.no_grad():
        out = enc(x)
    assert out.dtype == want and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("size", [SIDE, 320])
def test_params_only_cast_keeps_the_forward_in_one_dtype(size: int) -> None:
    """DeepSpeed's bf16 mode casts parameters, not buffers; the fp32 table must not leak into the forward.

    (Only tokens_plus_clip holds a buffer; at 320 px its table is also resampled.)"""
    readout = "tokens_plus_clip"
    enc = DeepEncoder(DeepEncoderSpec.tiny(), readout)  # type: ignore[arg-type]
    reference = DeepEncoder(DeepEncoderSpec.tiny(), readout).to(torch.bfloat16)  # type: ignore[arg-type]
    reference.load_state_dict(enc.state_dict())
    for p in enc.parameters():
        p.data = p.data.to(torch.bfloat16)
    x = torch.rand(1, 3, size, size) * 2 - 1
    with torch.no_grad():
        out = enc(x)
        want = reference(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want)


# -- pixel normalisation (issue 11) ----------------------------------------------------------


def test_pixel_norm_default_is_deepseek_ocr_and_clip_is_available(tiny_ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ocrmem.encoder"):
        default = load_deepencoder(tiny_ckpt, readout="tokens_plus_clip")
        clip = load_deepencoder(tiny_ckpt, readout="tokens_plus_clip", pixel_norm="clip")
    assert default.pixel_norm == "deepseek_ocr" and clip.pixel_norm == "clip"
    assert "pixel normalisation 'deepseek_ocr' (mean (0.5, 0.5, 0.5)" in caplog.text
    assert "pixel normalisation 'clip' (mean (0.48145466" in caplog.text

    u8 = torch.randint(0, 256, (2, 3, SIDE, SIDE), dtype=torch.uint8)
    with torch.no_grad():
        # The clip encoder takes the renderer's [-1, 1] pixels and sees CLIP-normalised ones.
        got = clip(normalize_pixels(u8))
        want = default(normalize_pixels(u8, "clip"))
        plain = default(normalize_pixels(u8))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the two normalisations really differ

    # The choice survives save -> load; an explicit argument wins.
    saved = save_deepencoder(clip, tmp_path / "clip")
    assert json.loads((saved / "config.json").read_text())["ocrmem_pixel_norm"] == "clip"
    assert load_deepencoder(saved).pixel_norm == "clip"
    assert load_deepencoder(saved, pixel_norm="deepseek_ocr").pixel_norm == "deepseek_ocr"


def test_normalize_pixels_values_and_errors() -> None:
    u8 = torch.tensor([0, 127, 128, 255], dtype=torch.uint8).view(1, 1, 2, 2)
    out = normalize_pixels(u8)
    assert out.shape == (1, 3, 2, 2) and out.dtype == torch.float32
    # DeepSeek-OCR's ToTensor + Normalize(0.5, 0.5), in fp32.
    assert torch.equal(out[0, 0].flatten(), (torch.tensor([0.0, 127.0, 128.0, 255.0]) / 255 - 0.5) / 0.5)
    clip = normalize_pixels(u8, "clip")
    mean, std = encoder_module.PIXEL_NORMS["clip"]
    assert clip[0, 2, 0, 0].item() == pytest.approx(-mean[2] / std[2])
    with pytest.raises(ConfigError, match=r"`pixel_norm` must be one of \('deepseek_ocr', 'clip'\), got 'imagenet'"):
        normalize_pixels(u8, "imagenet")
    with pytest.raises(ConfigError, match="pixel_norm"):
        DeepEncoder(DeepEncoderSpec.tiny(), pixel_norm="CLIP")
    with pytest.raises(ValueError, match=r"must be uint8 .* got torch.float32"):
        normalize_pixels(u8.float())


def test_invalid_pixel_norm_in_config_is_a_checkpoint_error(tiny_ckpt: Path, tmp_path: Path) -> None:
    def bad(config: dict) -> dict:
        config["ocrmem_pixel_norm"] = "imagenet"
        return config

    ckpt = rewrite(tiny_ckpt, tmp_path / "badnorm", lambda t: t, bad)
    with pytest.raises(CheckpointError, match=r"`ocrmem_pixel_norm` in .*config\.json is invalid.*'imagenet'"):
        load_deepencoder(ckpt)


def test_saved_encoder_files_read_like_any_other_file(tmp_path: Path) -> None:
    """save_deepencoder writes with the mode open() gives (0644 under umask 022), not 0600 (issue 11)."""
    from ocrmem.fileio import default_file_mode

    saved = save_deepencoder(DeepEncoder(DeepEncoderSpec.tiny()), tmp_path / "enc")
    for name in ("model.safetensors", "config.json"):
        assert (saved / name).stat().st_mode & 0o777 == default_file_mode(), name
    assert not list(saved.glob(".*.tmp"))  # no temp file left behind
