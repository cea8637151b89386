"""LLM pre-training: memory slots = noise + the answer's first-token embedding in a span."""
import random, time, torch
from ocrmem.data import synthetic_memory_examples, format_turn
from ocrmem.modeling import causal_lm_loss, left_pad, IGNORE_INDEX

def pretrain(llm, tok, mem_id, steps=300, bs=32, lr=3e-3, seed=0, tpp=16, max_pages=2, span=(1, 4)):
    t0 = time.time()
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    ex = synthetic_memory_examples(2048, seed=seed + 20000, filler_turns=0)
    rows = []
    for e in ex:
        p = list(tok(format_turn("user", e["prompt"]) + "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
        a = list(tok(e["response"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"])
        rows.append((p, a))
    emb = llm.get_input_embeddings()
    for q in llm.parameters(): q.requires_grad_(True)
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    llm.train(); losses = []
    for step in range(steps):
        batch = [rows[rng.randrange(len(rows))] for _ in range(bs)]
        ids, labs, fill = [], [], []
        for p, a in batch:
            n = tpp * rng.randint(1, max_pages)
            k = n if span is None else rng.randint(*span); at = rng.randrange(n - k + 1)
            ids.append([mem_id] * n + p + a); labs.append([IGNORE_INDEX] * (n + len(p)) + a)
            fill.append((n, at, k, a[0]))
        b = left_pad(ids, labs, tok.pad_token_id)
        with torch.no_grad():
            scale = emb.weight.std()
        e = emb(b["input_ids"])
        slots = []
        for n, at, k, first in fill:
            s = torch.randn(n, e.shape[-1], generator=g) * scale * (0.5 + 1.5 * torch.rand(1, generator=g))
            s[at:at + k] = s[at:at + k] * 0.3 + emb.weight[first]
            slots.append(s)
        mask = (b["input_ids"] == mem_id).unsqueeze(-1).expand_as(e)
        e = e.masked_scatter(mask, torch.cat(slots))
        am = b["attention_mask"]; pos = (am.cumsum(-1) - 1).clamp(min=0)
        loss = causal_lm_loss(llm(inputs_embeds=e, attention_mask=am, position_ids=pos, use_cache=False).logits, b["labels"])
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0); opt.step(); sched.step()
        losses.append(float(loss))
    for q in llm.parameters(): q.requires_grad_(False)
    llm.eval()
    print("pretrain first %.3f last %.3f sec %.1f" % (losses[0], sum(losses[-10:]) / 10, time.time() - t0), flush=True)
