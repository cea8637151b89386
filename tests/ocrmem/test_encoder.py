"""Tests for ocrmem.encoder: DeepEncoderSpec, SAM/CLIP building blocks, both read-outs, checkpoint I/O."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import ocrmem.encoder as encoder_module
from ocrmem.encoder import (
    DeepEncoder,
    DeepEncoderSpec,
    decomposed_rel_pos_bias,
    get_rel_pos,
    load_deepencoder,
    save_deepencoder,
    window_partition,
    window_unpartition,
)
from ocrmem.errors import CheckpointError, ConfigError

KEYS_TSV = Path(__file__).resolve().parents[1] / "data" / "deepseek-ocr-encoder-keys.tsv"

PAGES = 2
TINY_SIDE = 256  # DeepEncoderSpec.tiny().image_size
TINY_GRID = 4  # 256 px / 64 px per token
TINY_CLIP_WIDTH = 64
TINY_PROJECTOR_OUT = 96

SAM_PARAMS = 95_569_152
CLIP_PARAMS = 303_177_728
PROJECTOR_PARAMS = 2_622_720
DEEPSEEK_OCR_PARAMS = 401_372_160
TOKENS_PLUS_CLIP_PARAMS = 397_880_576

READOUTS = ("deepseek_ocr", "tokens_plus_clip")
ATOL = 1e-5
RTOL = 1e-5


def read_tsv(path: Path) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape from the published key list."""
    shapes = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or line.startswith("key\t") or not line.strip():
            continue
        key, shape, numel = line.split("\t")
        shapes[key] = tuple(int(s) for s in shape.split("x"))
        assert math.prod(shapes[key]) == int(numel)
    return shapes


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def pages(n: int = PAGES, side: int = TINY_SIDE) -> torch.Tensor:
    return torch.randn(n, 3, side, side)


def rewrite_checkpoint(directory: Path, mutate: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Load model.safetensors, let ``mutate`` edit the dict, write it back."""
    tensors = load_file(directory / "model.safetensors")
    mutate(tensors)
    save_file(tensors, directory / "model.safetensors")


@pytest.fixture(scope="module")
def full_meta() -> dict[str, DeepEncoder]:
    """Full-size encoders of both read-outs on the meta device (no memory)."""
    with torch.device("meta"):
        return {readout: DeepEncoder(DeepEncoderSpec.full(), readout) for readout in READOUTS}


@pytest.fixture
def saved_deepseek_ocr(tmp_path: Path) -> tuple[DeepEncoder, Path]:
    """A tiny deepseek_ocr encoder and the checkpoint directory it was saved to."""
    encoder = DeepEncoder(DeepEncoderSpec.tiny(), "deepseek_ocr")
    return encoder, save_deepencoder(encoder, tmp_path / "ocr")


class TestDeepEncoderSpec:
    def test_defaults_are_deepseek_ocr_when_full(self) -> None:
        spec = DeepEncoderSpec.full()
        assert spec == DeepEncoderSpec()
        assert (spec.sam_grid, spec.clip_grid) == (64, 16)
        assert spec.sam_global_layers == (2, 5, 8, 11)

    @pytest.mark.parametrize("preset", [DeepEncoderSpec.full, DeepEncoderSpec.tiny])
    def test_dict_round_trips_through_json_when_preset(self, preset: Callable[[], DeepEncoderSpec]) -> None:
        spec = preset()
        assert DeepEncoderSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec

    @pytest.mark.parametrize(
        "field, value",
        [
            ("clip_width", 512),  # != compressor_chans[-1]
            ("image_size", 1000),  # not a multiple of 64
            ("sam_heads", 7),  # does not divide 768
            ("sam_global_layers", (2, 12)),  # 12 >= sam_depth
            ("clip_positions", 256),  # not g*g + 1
            ("projector_in", 1024),  # != 2 * clip_width
            ("sam_depth", 0),
            ("sam_mlp_ratio", -1.0),
            ("compressor_chans", (512,)),
        ],
    )
    def test_raises_config_error_naming_field_when_value_invalid(self, field: str, value: object) -> None:
        with pytest.raises(ConfigError, match=f"`{field}`") as info:
            DeepEncoderSpec(**{field: value})
        assert str(value) in str(info.value)

    def test_from_dict_raises_when_field_unknown(self) -> None:
        with pytest.raises(ConfigError, match="sam_widht"):
            DeepEncoderSpec.from_dict({"sam_widht": 768})


class TestCheckpointLayout:
    def test_parameters_equal_published_keys_when_full_deepseek_ocr(self, full_meta: dict[str, DeepEncoder]) -> None:
        expected = read_tsv(KEYS_TSV)
        named = {"model." + name: tuple(p.shape) for name, p in full_meta["deepseek_ocr"].named_parameters()}
        assert len(expected) == 476
        assert named == expected
        assert sum(math.prod(s) for s in named.values()) == DEEPSEEK_OCR_PARAMS

    def test_parameter_counts_when_full(self, full_meta: dict[str, DeepEncoder]) -> None:
        encoder = full_meta["deepseek_ocr"]
        assert numel(encoder.sam_model) == SAM_PARAMS
        assert numel(encoder.vision_model) == CLIP_PARAMS
        assert numel(encoder.projector) == PROJECTOR_PARAMS
        assert numel(encoder) == DEEPSEEK_OCR_PARAMS

    def test_position_table_is_buffer_when_tokens_plus_clip(self, full_meta: dict[str, DeepEncoder]) -> None:
        encoder = full_meta["tokens_plus_clip"]
        assert numel(encoder) == TOKENS_PLUS_CLIP_PARAMS
        assert numel(encoder) == SAM_PARAMS + CLIP_PARAMS - 866_304
        assert dict(encoder.named_buffers()).keys() == {"vision_model.embeddings.position_embedding.weight"}
        names = {name for name, _ in encoder.named_parameters()}
        assert not any(n.startswith(("projector.", "image_newline", "view_seperator")) for n in names)
        assert not any("class_embedding" in n or "patch_embedding" in n for n in names)

    def test_state_dict_keys_are_checkpoint_keys_without_prefix_when_deepseek_ocr(
        self, full_meta: dict[str, DeepEncoder]
    ) -> None:
        # No non-persistent buffer (position_ids) and nothing beyond the published keys.
        assert {"model." + k for k in full_meta["deepseek_ocr"].state_dict()} == set(read_tsv(KEYS_TSV))

    def test_spec_is_inferred_when_shapes_are_deepseek_ocr(self) -> None:
        shapes = read_tsv(KEYS_TSV)
        shapes["model.vision_model.post_layernorm.weight"] = (1024,)
        assert encoder_module._infer_spec(shapes, Path("deepseek-ocr")) == DeepEncoderSpec.full()

    @pytest.mark.parametrize(
        "readout, side, expected",
        [
            ("tokens_plus_clip", 512, 64),
            ("tokens_plus_clip", 640, 100),
            ("tokens_plus_clip", 1024, 256),
            ("tokens_plus_clip", 1280, 400),
            ("deepseek_ocr", 640, 10 * 11 + 1),
            ("deepseek_ocr", 1024, 16 * 17 + 1),
        ],
    )
    def test_tokens_per_page_when_image_size_given(
        self, full_meta: dict[str, DeepEncoder], readout: str, side: int, expected: int
    ) -> None:
        assert full_meta[readout].tokens_per_page(side) == expected

    def test_tokens_per_page_raises_when_image_size_not_multiple_of_64(
        self, full_meta: dict[str, DeepEncoder]
    ) -> None:
        with pytest.raises(ConfigError, match="`image_size`"):
            full_meta["tokens_plus_clip"].tokens_per_page(1000)


class TestSamBuildingBlocks:
    def test_window_partition_round_trips_when_padding_needed(self) -> None:
        x = torch.randn(2, 10, 7, 8)  # (B, H, W, C); window 4 pads to 12 x 8
        windows, padded = window_partition(x, 4)
        assert windows.shape == (2 * 3 * 2, 4, 4, 8)
        assert padded == (12, 8)
        torch.testing.assert_close(windows[0], x[0, :4, :4], atol=0, rtol=0)
        torch.testing.assert_close(window_unpartition(windows, 4, padded, (10, 7)), x, atol=0, rtol=0)

    def test_get_rel_pos_indexes_offsets_when_table_fits(self) -> None:
        table = torch.randn(2 * 5 - 1, 3)
        rel = get_rel_pos(5, 5, table)  # (q, k, hd)
        assert rel.shape == (5, 5, 3)
        torch.testing.assert_close(rel[4, 0], table[8], atol=0, rtol=0)  # offset +4
        torch.testing.assert_close(rel[0, 4], table[0], atol=0, rtol=0)  # offset -4

    def test_get_rel_pos_resamples_when_table_size_differs(self) -> None:
        table = torch.randn(2 * 4 - 1, 3)
        assert get_rel_pos(6, 6, table).shape == (6, 6, 3)

    def test_sdpa_with_rel_pos_bias_matches_explicit_softmax(self) -> None:
        torch.manual_seed(0)
        B, H, W, hd = 3, 4, 5, 8
        q, k, v = (torch.randn(B, H * W, hd) for _ in range(3))
        rel_h, rel_w = torch.randn(2 * H - 1, hd), torch.randn(2 * W - 1, hd)
        bias = decomposed_rel_pos_bias(q, rel_h, rel_w, (H, W), (H, W))  # (B, HW, HW)
        # Explicit form: score(i, j) = q_i.k_j / sqrt(hd) + q_i.Rh[r_i - r_j] + q_i.Rw[c_i - c_j]
        rows = torch.arange(H * W) // W
        cols = torch.arange(H * W) % W
        Rh = rel_h[(rows[:, None] - rows[None, :]) + H - 1]  # (HW, HW, hd)
        Rw = rel_w[(cols[:, None] - cols[None, :]) + W - 1]
        scores = q @ k.transpose(1, 2) / math.sqrt(hd) + torch.einsum("bic,ijc->bij", q, Rh + Rw)
        expected = scores.softmax(-1) @ v
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


class TestDeepEncoderForward:
    @pytest.mark.parametrize(
        "readout, tokens, width",
        [
            ("tokens_plus_clip", TINY_GRID * TINY_GRID, TINY_CLIP_WIDTH),
            ("deepseek_ocr", TINY_GRID * (TINY_GRID + 1) + 1, TINY_PROJECTOR_OUT),
        ],
    )
    def test_output_shape_when_readout(self, readout: str, tokens: int, width: int) -> None:
        encoder = DeepEncoder(DeepEncoderSpec.tiny(), readout)
        out = encoder(pages())
        assert out.shape == (PAGES, tokens, width)
        assert encoder.tokens_per_page() == tokens
        assert encoder.output_dim == width
        assert torch.isfinite(out).all()

    @pytest.mark.parametrize("readout", READOUTS)
    @pytest.mark.parametrize("side", [128, 320])
    def test_positions_are_resampled_when_image_size_differs_from_spec(self, readout: str, side: int) -> None:
        encoder = DeepEncoder(DeepEncoderSpec.tiny(), readout)
        out = encoder(pages(1, side))
        assert out.shape == (1, encoder.tokens_per_page(side), encoder.output_dim)
        assert torch.isfinite(out).all()

    def test_newline_ends_each_row_and_separator_ends_page_when_deepseek_ocr(self) -> None:
        encoder = DeepEncoder(DeepEncoderSpec.tiny(), "deepseek_ocr")
        out = encoder(pages())  # (P, h*(w+1)+1, D)
        w = TINY_GRID
        newlines = out[:, w : TINY_GRID * (w + 1) : w + 1]  # (P, h, D)
        torch.testing.assert_close(newlines, encoder.image_newline.expand_as(newlines), atol=0, rtol=0)
        torch.testing.assert_close(out[:, -1], encoder.view_seperator.expand(PAGES, -1), atol=0, rtol=0)

    def test_output_is_tokens_plus_clip_of_tokens_when_tokens_plus_clip(self) -> None:
        encoder = DeepEncoder(DeepEncoderSpec.tiny(), "tokens_plus_clip")
        x = pages()
        tokens = encoder.sam_model(x).flatten(2).transpose(1, 2)  # (P, N, C)
        table = encoder.vision_model.embeddings.position_embedding.weight
        clip = encoder.vision_model.transformer(encoder.vision_model.pre_layrnorm(tokens + table[1:]))
        torch.testing.assert_close(encoder(x), tokens + clip, atol=ATOL, rtol=RTOL)

    @pytest.mark.parametrize("readout", READOUTS)
    def test_pages_are_encoded_independently_when_batched(self, readout: str) -> None:
        encoder = DeepEncoder(DeepEncoderSpec.tiny(), readout)
        x = pages()
        batched = encoder(x)
        single = torch.cat([encoder(x[i : i + 1]) for i in range(PAGES)])
        torch.testing.assert_close(batched, single, atol=ATOL, rtol=RTOL)

    def test_returns_empty_when_no_pages(self) -> None:
        encoder = DeepEncoder(DeepEncoderSpec.tiny(), "deepseek_ocr")
        assert encoder(pages(0)).shape == (0, encoder.tokens_per_page(), TINY_PROJECTOR_OUT)

    def test_input_is_cast_to_parameter_dtype_when_dtypes_differ(self) -> None:
        encoder = DeepEncoder(DeepEncoderSpec.tiny()).to(torch.bfloat16)
        assert encoder(pages(1)).dtype == torch.bfloat16

    def test_raises_value_error_when_pages_not_square(self) -> None:
        with pytest.raises(ValueError, match=r"\(pages, 3, S, S\)"):
            DeepEncoder(DeepEncoderSpec.tiny())(torch.randn(1, 3, 256, 192))

    def test_raises_config_error_when_readout_unknown(self) -> None:
        with pytest.raises(ConfigError, match="`readout`"):
            DeepEncoder(DeepEncoderSpec.tiny(), "clip_only")  # type: ignore[arg-type]


class TestGradient:
    @pytest.mark.parametrize("readout", READOUTS)
    def test_output_has_no_grad_fn_when_all_frozen(self, readout: str) -> None:
        encoder = DeepEncoder(DeepEncoderSpec.tiny(), readout).requires_grad_(False)
        assert encoder(pages(1)).grad_fn is None

    @pytest.mark.parametrize("readout", READOUTS)
    def test_gradient_reaches_last_clip_layer_when_it_is_trainable(self, readout: str) -> None:
        encoder = DeepEncoder(DeepEncoderSpec.tiny(), readout).requires_grad_(False)
        last = encoder.vision_model.transformer.layers[-1]
        last.requires_grad_(True)
        out = encoder(pages(1))
        assert out.grad_fn is not None
        out.square().mean().backward()
        for name, p in last.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert all(p.grad is None for p in encoder.sam_model.parameters())


class TestCheckpointIO:
    @pytest.mark.parametrize("readout", READOUTS)
    def test_round_trip_is_bit_identical_when_readout(self, tmp_path: Path, readout: str) -> None:
        encoder = DeepEncoder(DeepEncoderSpec.tiny(), readout)
        loaded = load_deepencoder(save_deepencoder(encoder, tmp_path), readout=readout)
        assert loaded.spec == encoder.spec
        x = pages()
        torch.testing.assert_close(loaded(x), encoder(x), atol=0, rtol=0)
        assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])

    def test_saved_file_holds_every_deepseek_ocr_key_when_tokens_plus_clip(self, tmp_path: Path) -> None:
        encoder = DeepEncoder(DeepEncoderSpec.tiny(), "tokens_plus_clip")
        save_deepencoder(encoder, tmp_path)
        with torch.device("meta"):
            reference = DeepEncoder(DeepEncoderSpec.tiny(), "deepseek_ocr")
        saved = load_file(tmp_path / "model.safetensors")
        assert {k: tuple(v.shape) for k, v in saved.items()} == {
            "model." + k: tuple(v.shape) for k, v in reference.state_dict().items()
        }
        assert load_deepencoder(tmp_path, readout="deepseek_ocr")(pages(1)).shape == (1, 21, TINY_PROJECTOR_OUT)

    def test_sam_and_clip_weights_match_when_tokens_plus_clip_loads_deepseek_ocr_checkpoint(
        self, saved_deepseek_ocr: tuple[DeepEncoder, Path]
    ) -> None:
        source, directory = saved_deepseek_ocr
        loaded = load_deepencoder(directory, readout="tokens_plus_clip")
        reference = source.state_dict()
        for name, value in loaded.state_dict().items():
            torch.testing.assert_close(value, reference[name], atol=0, rtol=0, msg=name)

    def test_config_holds_model_type_spec_and_extra_entries(self, tmp_path: Path) -> None:
        encoder = DeepEncoder(DeepEncoderSpec.tiny())
        save_deepencoder(encoder, tmp_path, extra_config={"note": "tiny"})
        config = json.loads((tmp_path / "config.json").read_text())
        assert config["model_type"] == "deepseek_vl_v2"
        assert config["note"] == "tiny"
        assert DeepEncoderSpec.from_dict(config["ocrmem_encoder"]) == encoder.spec
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]

    def test_dtype_argument_casts_when_given(self, saved_deepseek_ocr: tuple[DeepEncoder, Path]) -> None:
        loaded = load_deepencoder(saved_deepseek_ocr[1], dtype=torch.bfloat16)
        assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
        assert loaded(pages(1)).dtype == torch.bfloat16

    def test_loads_vision_keys_only_when_checkpoint_has_lm_keys_and_post_layernorm(
        self,
        saved_deepseek_ocr: tuple[DeepEncoder, Path],
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        source, directory = saved_deepseek_ocr

        def add_lm_keys(tensors: dict[str, torch.Tensor]) -> None:
            tensors["model.layers.0.mlp.up_proj.weight"] = torch.randn(8, 8)
            tensors["model.embed_tokens.weight"] = torch.randn(16, 8)
            tensors["lm_head.weight"] = torch.randn(16, 8)
            tensors["model.vision_model.post_layernorm.weight"] = torch.ones(TINY_CLIP_WIDTH)
            tensors["model.vision_model.post_layernorm.bias"] = torch.zeros(TINY_CLIP_WIDTH)
            tensors["model.vision_model.embeddings.position_ids"] = torch.arange(17)[None]

        rewrite_checkpoint(directory, add_lm_keys)
        read: list[str] = []
        real_safe_open = encoder_module.safe_open

        class RecordingHandle:
            def __init__(self, *args: object, **kwargs: object) -> None:
                self._inner = real_safe_open(*args, **kwargs)

            def __enter__(self) -> RecordingHandle:
                self._handle = self._inner.__enter__()
                return self

            def __exit__(self, *exc: object) -> None:
                self._inner.__exit__(*exc)

            def __getattr__(self, name: str) -> object:
                return getattr(self._handle, name)

            def get_tensor(self, key: str) -> torch.Tensor:
                read.append(key)
                return self._handle.get_tensor(key)

        monkeypatch.setattr(encoder_module, "safe_open", RecordingHandle)
        with caplog.at_level(logging.INFO, logger="ocrmem.encoder"):
            loaded = load_deepencoder(directory, readout="deepseek_ocr")
        assert "post_layernorm" in caplog.text
        assert "model.sam_model.pos_embed" in read
        assert all(k.startswith("model.") and "layers.0.mlp.up_proj" not in k for k in read)
        assert not any(k.startswith(("lm_head", "model.embed_tokens", "model.layers.")) for k in read)
        x = pages(1)
        torch.testing.assert_close(loaded(x), source(x), atol=0, rtol=0)

    def test_loads_when_sharded_with_index(self, saved_deepseek_ocr: tuple[DeepEncoder, Path]) -> None:
        source, directory = saved_deepseek_ocr
        tensors = load_file(directory / "model.safetensors")
        (directory / "model.safetensors").unlink()
        keys = sorted(tensors)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, shard_keys in shards.items():
            save_file({k: tensors[k] for k in shard_keys}, directory / name)
        index = {"weight_map": {k: name for name, shard_keys in shards.items() for k in shard_keys}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
        x = pages(1)
        torch.testing.assert_close(load_deepencoder(directory, "deepseek_ocr")(x), source(x), atol=0, rtol=0)

    def test_raises_naming_key_when_key_missing(self, saved_deepseek_ocr: tuple[DeepEncoder, Path]) -> None:
        directory = saved_deepseek_ocr[1]
        rewrite_checkpoint(directory, lambda t: t.pop("model.sam_model.blocks.1.attn.qkv.weight"))
        with pytest.raises(CheckpointError, match=r"missing model\.sam_model\.blocks\.1\.attn\.qkv\.weight"):
            load_deepencoder(directory)

    def test_raises_with_expected_and_found_shapes_when_shape_wrong(
        self, saved_deepseek_ocr: tuple[DeepEncoder, Path]
    ) -> None:
        directory = saved_deepseek_ocr[1]

        def shrink(tensors: dict[str, torch.Tensor]) -> None:
            tensors["model.vision_model.pre_layrnorm.weight"] = torch.ones(TINY_CLIP_WIDTH - 1)

        rewrite_checkpoint(directory, shrink)
        with pytest.raises(CheckpointError, match=r"pre_layrnorm\.weight: expected \(64\), found \(63\)"):
            load_deepencoder(directory)

    def test_lists_ten_keys_then_count_when_many_missing(self, saved_deepseek_ocr: tuple[DeepEncoder, Path]) -> None:
        directory = saved_deepseek_ocr[1]

        def drop_clip_layers(tensors: dict[str, torch.Tensor]) -> None:
            for key in [k for k in tensors if ".transformer.layers." in k]:
                del tensors[key]

        rewrite_checkpoint(directory, drop_clip_layers)
        with pytest.raises(CheckpointError, match=r"24 missing key\(s\)") as info:
            load_deepencoder(directory)
        assert "and 14 more" in str(info.value)
        assert str(info.value).count("\n  missing ") == 10

    @pytest.mark.parametrize("damage", ["garbage", "truncated"])
    def test_raises_naming_file_when_safetensors_corrupt(
        self, saved_deepseek_ocr: tuple[DeepEncoder, Path], damage: str
    ) -> None:
        weights = saved_deepseek_ocr[1] / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(b"\x13not a safetensors file" * 7 if damage == "garbage" else data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="model.safetensors"):
            load_deepencoder(weights.parent)

    def test_raises_when_directory_has_no_safetensors(self, tmp_path: Path) -> None:
        (tmp_path / "config.json").write_text("{}")
        with pytest.raises(CheckpointError, match=r"No \*\.safetensors file"):
            load_deepencoder(tmp_path)

    def test_raises_file_not_found_naming_path_when_directory_missing(self, tmp_path: Path) -> None:
        missing = tmp_path / "no-such-checkpoint"
        with pytest.raises(FileNotFoundError, match="no-such-checkpoint"):
            load_deepencoder(missing)

    def test_save_refuses_when_directory_holds_other_weights(self, tmp_path: Path) -> None:
        save_file({"x": torch.zeros(1)}, tmp_path / "model-00001-of-00001.safetensors")
        with pytest.raises(FileExistsError, match="model-00001-of-00001"):
            save_deepencoder(DeepEncoder(DeepEncoderSpec.tiny()), tmp_path)
