import sys, time, random, torch, torch.nn.functional as F, argparse
sys.path.insert(0, '.')
from ocrmem.tiny import write_tiny
from ocrmem.modeling import MEMModel, causal_lm_loss, left_pad
from ocrmem.data import MemoryCollator, synthetic_memory_examples
from ocrmem.projector import build_projector
from pathlib import Path
p = argparse.ArgumentParser()
p.add_argument('--filler', type=int, default=6); p.add_argument('--steps', type=int, default=200)
p.add_argument('--bs', type=int, default=8); p.add_argument('--lr', type=float, default=1e-3)
p.add_argument('--n', type=int, default=512); p.add_argument('--seed', type=int, default=0)
p.add_argument('--dir', default='/tmp/memgain_tiny')
p.add_argument('--pre', type=int, default=0)  # reader pre-training steps (ocrmem.reader_pretraining)
a = p.parse_args()
torch.set_num_threads(2)
t0 = time.time()
if not (Path(a.dir)/'config.json').exists(): write_tiny(a.dir, seed=0)
m = MEMModel.from_pretrained(a.dir); m.eval()
col = MemoryCollator.for_model(m)
def prep(ex):
    out = []
    for i in range(0, len(ex), a.bs):
        b = col(ex[i:i+a.bs]); pv = b.pop('pixel_values')
        with torch.no_grad(): f = m.ocr_embed(pv)
        out.append((b, f))
    return out
tr = prep(synthetic_memory_examples(a.n, seed=a.seed, filler_turns=a.filler))
ev = prep(synthetic_memory_examples(64, seed=a.seed+10000, filler_turns=a.filler))
print('prep', time.time()-t0, 'feat', tr[0][1].shape, flush=True)
llm = m.base_llm; mid = m.memory_token_id
import os
ck='/tmp/memgain_llm_%d.pt'%a.pre
if a.pre and os.path.exists(ck): llm.load_state_dict(torch.load(ck))
elif a.pre:
    from ocrmem.reader_pretraining import pretrain_reader
    r = pretrain_reader(llm, m.tokenizer, steps=a.pre, batch_size=16); torch.save(llm.state_dict(), ck)
    print('pretrain first %.3f last %.3f' % (r.first_loss, r.last_loss), flush=True)
for q in llm.parameters(): q.requires_grad_(False)
torch.manual_seed(a.seed)
proj = build_projector('mlp2x_gelu', tr[0][1].shape[-1], llm.get_input_embeddings().embedding_dim)
def fwd(b, f):
    ids, mask = b['input_ids'], b['attention_mask']
    e = llm.get_input_embeddings()(ids)
    v = proj(f); slots = (ids == mid).unsqueeze(-1).expand_as(e)
    e = e.masked_scatter(slots, v.reshape(-1, v.shape[-1]))
    pos = (mask.cumsum(-1)-1).clamp(min=0)
    return llm(inputs_embeds=e, attention_mask=mask, position_ids=pos, use_cache=False).logits
def gain():
    own = sh = 0.0; n = 0
    with torch.no_grad():
        for b, f in ev:
            lab = b['labels']
            lo = fwd(b, f); ls = fwd(b, f.roll(1, 0))  # all rows same #pages? check
            def s(lg): return F.cross_entropy(lg[:, :-1].transpose(1, 2), lab[:, 1:], ignore_index=-100, reduction='sum')
            own += float(s(lo)); sh += float(s(ls)); n += int((lab[:, 1:] != -100).sum())
    return own/n, sh/n
opt = torch.optim.AdamW(proj.parameters(), lr=a.lr, weight_decay=0.0)
rng = random.Random(a.seed)
for step in range(a.steps):
    b, f = tr[rng.randrange(len(tr))]
    loss = causal_lm_loss(fwd(b, f), b['labels'])
    opt.zero_grad(); loss.backward(); opt.step()
    if step % max(1, a.steps//5) == 0 or step == a.steps-1:
        o, s = gain(); print(step, 'loss %.3f own %.3f shuf %.3f gain %.4f t %.0f' % (float(loss), o, s, s-o, time.time()-t0), flush=True)
