import sys, torch, torch.nn.functional as F
from ocrmem.modeling import MEMModel
from ocrmem.data import MemoryCollator, synthetic_memory_examples, _NAMES, _CITIES, _COLORS
torch.set_num_threads(2)
m = MEMModel.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else '/tmp/memgain_tiny'); m.eval(); col = MemoryCollator.for_model(m)
vals = _NAMES + _CITIES + _COLORS
def feats(n, seed, filler):
    ex = synthetic_memory_examples(n, seed=seed, filler_turns=filler); X = []
    for i in range(0, n, 32):
        b = col(ex[i:i+32]); pv = b['pixel_values']
        with torch.no_grad(): f = m.ocr_embed(pv)
        npg = [(row == m.memory_token_id).sum().item() // m.tokens_per_page for row in b['input_ids']]
        X += [p for p in torch.split(f, npg)]
    return X, torch.tensor([vals.index(e['response']) for e in ex])
for filler in (0, 2):
    Xtr, ytr = feats(512, 0, filler); Xev, yev = feats(256, 10000, filler)
    for name, fn in (('flat page1', lambda x: x[0].flatten()), ('mean', lambda x: x.reshape(-1, x.shape[-1]).mean(0))):
        A = torch.stack([fn(x) for x in Xtr]); B = torch.stack([fn(x) for x in Xev])
        mu, sd = A.mean(0), A.std(0) + 1e-6; A = (A - mu) / sd; B = (B - mu) / sd
        W = torch.zeros(A.shape[1], 24, requires_grad=True); opt = torch.optim.Adam([W], lr=1e-2)
        for _ in range(500):
            l = F.cross_entropy(A @ W, ytr) + 1e-3 * W.pow(2).sum(); opt.zero_grad(); l.backward(); opt.step()
        print(f'filler {filler} {name}: train {((A@W).argmax(1)==ytr).float().mean():.2f} eval {((B@W).argmax(1)==yev).float().mean():.2f}', flush=True)
