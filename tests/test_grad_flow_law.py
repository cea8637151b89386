"""The grad-flow law, as hypothesis properties over the tiny preset.

For every drawn scenario (trainable set, pages per row, batch size, lengths, checkpointing, entry
point):

* every trainable parameter receives a finite gradient — or, for a batch with no pages at all,
  the documented behaviour happens (EmptyMemoryWarning, proj's gradient exactly zero);
* every frozen parameter's ``.grad`` stays None;
* a frozen module is tracked by autograd exactly when it lies on a path from a trainable
  parameter to the loss;
* ``diagnostics.diagnose`` reports status ok (batches with memory);
* merged length, attention mask and label masking match the pages and tokens drawn.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from torch import nn

from diagnostics import diagnose
from ocrmem import EmptyMemoryWarning, MEMModel
from ocrmem.modeling import IGNORE_INDEX, set_trainable_params

from .strategies import Draw, scenarios

LORA_AT = "ocr_embed.vision_model.transformer.layers.0.mlp.fc1"
SEED_THRESHOLD = 8  # tokens of history kept as text in the seed path


class LoRASide(nn.Module):
    """A LoRA-style side path: ``base(x) + scale * B(A(x))``; A and B are the trainable part."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.lora_b = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)  # non-zero: A gets gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T


@pytest.fixture(scope="module")
def law_model(tiny_dir) -> MEMModel:
    model = MEMModel.from_pretrained(tiny_dir)
    mlp = model.ocr_embed.vision_model.transformer.layers[0].mlp
    mlp.fc1 = LoRASide(mlp.fc1)
    return model


def _prefixes(model: MEMModel, trainable: str) -> list[str]:
    last = len(model.ocr_embed.vision_model.transformer.layers) - 1
    extra = {
        "proj": [],
        "proj+encoder_last_block": [f"ocr_embed.vision_model.transformer.layers.{last}"],
        "proj+encoder_lora": [f"{LORA_AT}.lora_a", f"{LORA_AT}.lora_b"],
        "proj+llm_norm": ["base_llm.model.norm"],
    }[trainable]
    return ["proj", *extra]


def _build_batch(model: MEMModel, draw: Draw) -> tuple[dict, list[int]]:
    """Returns the batch and, per row, the merged length the model must produce (or -1 if unknown)."""
    tok = model.tokenizer
    marker = tok(model.config.assistant_marker, add_special_tokens=False)["input_ids"]
    T = model.tokens_per_page
    g = torch.Generator().manual_seed(sum(draw.pages) * 131 + sum(draw.recent))
    rows, labels, expected = [], [], []
    for pages, recent in zip(draw.pages, draw.recent):
        answer = torch.randint(0, 1000, (recent,), generator=g).tolist()
        if draw.seed_path:
            history_len = 40 * pages + SEED_THRESHOLD + 1 if pages else SEED_THRESHOLD // 2
            history = torch.randint(0, 1000, (history_len,), generator=g).tolist()
            rows.append(history + marker + answer)
            labels.append(history + marker + answer)
            expected.append(-1 if pages else len(rows[-1]))  # pages from rendering; checked below
        else:
            rows.append([model.memory_token_id] * (pages * T) + marker + answer)
            labels.append([IGNORE_INDEX] * (pages * T + len(marker)) + answer)
            expected.append(len(rows[-1]))
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    batch = {
        "input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
        "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
        "labels": torch.tensor([[IGNORE_INDEX] * (width - len(r)) + r for r in labels]),
    }
    if not draw.seed_path:
        n_pages = sum(draw.pages)
        side = model.page_size
        batch["pixel_values"] = torch.randn((n_pages, 3, side, side), generator=g)
    return batch, expected


def _tracked_recorder(model: MEMModel, names: list[str]) -> tuple[dict[str, bool], list]:
    seen: dict[str, bool] = {}
    handles = []
    modules = dict(model.named_modules())

    def first_tensor(out):
        if isinstance(out, torch.Tensor):
            return out
        values = out.values() if isinstance(out, dict) else out
        return next((v for v in values if isinstance(v, torch.Tensor)), None)

    for name in names:
        def hook(_m, _i, out, name=name):
            t = first_tensor(out)
            seen[name] = bool(t is not None and t.requires_grad)

        handles.append(modules[name].register_forward_hook(hook))
    return seen, handles


@given(draw=scenarios())
def test_grad_flow_law(law_model: MEMModel, draw: Draw) -> None:
    model = law_model
    prefixes = _prefixes(model, draw.trainable)
    set_trainable_params(model, prefixes)
    model.config.context_threshold = SEED_THRESHOLD
    model.zero_grad(set_to_none=True)
    model.train()
    if draw.checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    last = f"ocr_embed.vision_model.transformer.layers.{len(model.ocr_embed.vision_model.transformer.layers) - 1}"
    probes = ["ocr_embed.sam_model", last, "base_llm.model.layers.0", "base_llm.lm_head"]
    seen, handles = _tracked_recorder(model, probes)
    try:
        batch, expected = _build_batch(model, draw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model(**batch)
        n_pages = out.num_pages
        # -- merged layout -----------------------------------------------------------------------
        T = model.tokens_per_page
        lengths = out.attention_mask.sum(dim=1).tolist()
        assert out.logits.shape[1] == out.attention_mask.shape[1] == max(lengths)
        assert (out.attention_mask[:, -1] == 1).all()  # left padding: every row ends at the last column
        if draw.seed_path:
            marker_len = len(model.tokenizer(model.config.assistant_marker, add_special_tokens=False)["input_ids"])
            pages_seen = 0
            for row, (pages, recent) in enumerate(zip(draw.pages, draw.recent)):
                row_labels = out.labels[row][out.attention_mask[row].bool()].tolist()
                original = batch["labels"][row][batch["attention_mask"][row].bool()].tolist()
                if pages:  # compressed: memory tokens (labels masked) + marker + answer, history labels gone
                    n_mem = len(row_labels) - marker_len - recent
                    assert n_mem > 0 and n_mem % T == 0
                    assert row_labels[:n_mem] == [IGNORE_INDEX] * n_mem
                    assert row_labels[n_mem:] == original[-(marker_len + recent):]
                    pages_seen += n_mem // T
                else:  # short history: the row is untouched
                    assert lengths[row] == expected[row] and row_labels == original
            assert pages_seen == n_pages and (n_pages > 0) == any(draw.pages)
        else:
            assert n_pages == sum(draw.pages)
            assert lengths == expected
            memory = batch["input_ids"] == model.memory_token_id
            assert memory.sum().item() == n_pages * T
            assert (out.labels != IGNORE_INDEX).sum(dim=1).tolist() == list(draw.recent)  # only answers
        out.loss.backward()
        # -- gradients -----------------------------------------------------------------------------
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        for name, param in model.named_parameters():
            if name not in trainable:
                assert param.grad is None, f"frozen {name} got a gradient"
        encoder_trainable = any(n.startswith("ocr_embed") for n in trainable)
        for name, param in trainable.items():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            if n_pages:
                assert param.grad.abs().sum() > 0, f"{name}: zero gradient although memory was used"
        if not n_pages:
            assert any(issubclass(w.category, EmptyMemoryWarning) for w in caught)
            assert all((p.grad == 0).all() for p in model.proj.parameters())
        # -- tracking: frozen modules are tracked exactly on paths from trainable params to the loss
        if n_pages:
            assert seen["ocr_embed.sam_model"] is False
            if draw.trainable == "proj+encoder_lora":
                assert seen[last] is True  # frozen, downstream of the LoRA side path
            elif draw.trainable == "proj":
                assert seen[last] is False
            assert seen["base_llm.model.layers.0"] is True
        else:
            assert "ocr_embed.sam_model" not in seen
            assert seen["base_llm.model.layers.0"] is False
        assert seen["base_llm.lm_head"] is (bool(n_pages) or draw.trainable == "proj+llm_norm")
    finally:
        for handle in handles:
            handle.remove()
        if draw.checkpointing:
            model.activation_checkpointing_disable()
    # -- the diagnostic agrees ----------------------------------------------------------------------
    if n_pages:
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = diagnose(model, batch, expect_trainable=prefixes)
        assert report.status == "ok", report.to_text()
