"""The user's own quick check from seed-notes.md, run against the tiny preset.

Verbatim except for three things the task allows:
* ``from ocrmem import MEMModel, MEMConfig``;
* the two paths point at the tiny preset's ``llm/`` and ``ocr/``;
* ONE extra argument, ``context_threshold=32``. The check feeds 100 random tokens with no
  assistant marker; in such a row the last ``context_threshold`` tokens stay text and the older
  ones are history. With the default threshold (2048) nothing would be compressed, ``proj``
  would not take part — exactly the kind of batch that crashed the user's training — and the
  check's final loop would be vacuous. With 32, 68 tokens of history are rendered and encoded.
"""

import torch

from ocrmem import MEMConfig, MEMModel


def test_user_quick_check_passes_when_history_is_compressed(tiny_dir):
    config = MEMConfig(
        base_model_name=str(tiny_dir / "llm"), ocr_model_name=str(tiny_dir / "ocr"), context_threshold=32
    )
    model = MEMModel(config); model.train()
    dummy_input = torch.randint(0, 1000, (1, 100)); dummy_labels = torch.randint(0, 1000, (1, 100))
    outputs = model(input_ids=dummy_input, attention_mask=torch.ones_like(dummy_input), labels=dummy_labels)
    assert outputs.loss.requires_grad; outputs.loss.backward()
    for name, p in model.named_parameters():
        if "proj" in name and p.requires_grad: assert p.grad is not None

    # What the verbatim check cannot see, asserted so that it cannot pass vacuously:
    assert outputs.memory_used and outputs.num_pages >= 1
    proj_grads = [p.grad for p in model.proj.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in proj_grads)
    assert all(p.grad is None for p in model.base_llm.parameters())
    assert all(p.grad is None for p in model.ocr_embed.parameters())
