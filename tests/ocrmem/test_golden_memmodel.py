"""Golden values of the whole tiny MEMModel forward, on the fast and the seed path.

tests/data/golden_memmodel.safetensors holds, per LLM family and path, what crosses each
stage boundary for the seeded tiny preset and a fixed batch (see
tests/data/make_golden_memmodel.py, which regenerates it). A change anywhere on the numeric
path — rendering, tokenisation, encoder, proj, the merge into the LLM input, positions, the
loss — moves at least one of them.

Tolerances (fp32 on CPU; two runs here are bitwise equal, so these only absorb other CPUs'
summation order): pixels 1e-6 (row/column means of u8 / 127.5 - 1; one glyph pixel moves
a mean by >= 2.6e-3); encoder features and merged embeds 1e-5 abs + 1e-5 rel (values <= 4;
fp32 encoder noise measured against the published code: <= 8e-6); logits 1e-4 (values <= 3,
after two decoder layers); loss 1e-5 rel. Integer tensors (ids, labels, masks, positions)
must be equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.data.make_golden_memmodel import compute

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden_memmodel.safetensors"
FLOAT_TOLERANCES = {  # what -> (atol, rtol)
    "pixel_row_means": (1e-6, 0.0),
    "pixel_col_means": (1e-6, 0.0),
    "vision_features": (1e-5, 1e-5),
    "inputs_embeds": (1e-5, 1e-5),
    "logits": (1e-4, 1e-5),
    "loss": (0.0, 1e-5),
}
EXACT = ("input_ids", "labels", "llm_attention_mask", "position_ids")


@pytest.fixture(scope="module")
def current(tiny_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return compute(tiny_dir)


@pytest.fixture(scope="module")
def stored(current) -> dict[str, torch.Tensor]:
    _, env = current
    with safe_open(str(GOLDEN), framework="pt") as f:
        environments = json.loads(f.metadata()["environments"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    family = env["family"]
    if family not in environments:
        pytest.skip(
            f"no golden values for the tiny LLM family {family!r} (stored: {sorted(environments)}); "
            "add them with `python tests/data/make_golden_memmodel.py` in this environment"
        )
    want = environments[family]
    for key in ("font", "font_bytes"):
        if want[key] != env[key]:
            pytest.skip(
                f"the renderer's default font here is {env['font']} ({env['font_bytes']} bytes), the golden values "
                f"were rendered with {want['font']} ({want['font_bytes']} bytes); install fonts-wqy-microhei"
            )
    return {k[len(family) + 1:]: v for k, v in tensors.items() if k.startswith(family + "/")}


@pytest.mark.parametrize("path", ["fast", "seed"])
def test_memmodel_forward_matches_golden(current, stored, path: str) -> None:
    tensors, env = current
    got = {k[len(env["family"]) + 1:]: v for k, v in tensors.items()}
    keys = sorted(k for k in stored if k.startswith(path + "/"))
    assert keys == sorted(k for k in got if k.startswith(path + "/"))
    # Stage order: the first mismatch names the stage that changed.
    for what in ("input_ids", "labels", "llm_attention_mask", "position_ids", "pixel_row_means", "pixel_col_means",
                 "vision_features", "inputs_embeds", "logits", "loss"):
        key = f"{path}/{what}"
        if what in EXACT:
            assert torch.equal(got[key], stored[key]), f"{key} differs"
        else:
            atol, rtol = FLOAT_TOLERANCES[what]
            torch.testing.assert_close(got[key], stored[key], atol=atol, rtol=rtol, msg=lambda m: f"{key}: {m}")


def test_golden_batch_exercises_the_memory(stored) -> None:
    """The stored case is not trivial: on both paths two pages with ink reach the encoder."""
    for path in ("fast", "seed"):
        assert stored[f"{path}/vision_features"].shape[0] == 2  # two pages
        assert (stored[f"{path}/pixel_row_means"] < 1.0).any()  # ink on the pages
        assert torch.isfinite(stored[f"{path}/loss"]).all()
