"""Between the positive control (xmodal.py: colour-embedding image tokens) and the VLA: a plain Llama
whose 16 image tokens come from rendered PIXELS. K discs of palette colours on grey, one per 16x16 cell
(centred, radius r), a fresh layout per sample; the question names a colour word, the answer restates it
and gives the cell (col, row). Encoders: --enc linear (patch pixels -> Linear, what SigLIP's patch
embedding does: colour enters linearly) | mlp (patch -> Linear -> GELU -> Linear) | onehot (the control:
the palette index looked up, as xmodal). Score: column accuracy with the word teacher-forced (chance 1/4)."""
import argparse, json, sys, time
import numpy as np, torch
from transformers import LlamaConfig, LlamaForCausalLM
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # the repository
import sim
p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=1500); p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--seed", type=int, default=0); p.add_argument("--K", type=int, default=3)
p.add_argument("--every", type=int, default=250); p.add_argument("--enc", default="linear")
p.add_argument("--r", type=float, default=4.5); p.add_argument("--jitter", type=int, default=0)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--cell_answer", type=int, default=0)  # free: answer the disc centre's 16 px cell (col, row) instead of its pixel
p.add_argument("--nopos", type=int, default=0)  # 1: no learned position on the image tokens (rotary alone, as the VLA's language model)
p.add_argument("--free", type=int, default=0)  # 1: discs anywhere in 64x64 (>= 12 px apart), answer = word, x, y in pixels (as the VLA's disc probe)
a = p.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(a.seed)
COLS = np.array([sim.PALETTE[c] for c in sim.Variation().marker_colors], dtype=np.float32)  # (6, 3)
BOS, Q, WORD, NUM = 1, 2, 4, 10
V = NUM + 64
m = LlamaForCausalLM(LlamaConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                  intermediate_size=512, vocab_size=V, max_position_embeddings=64, tie_word_embeddings=False))
torch.nn.init.normal_(m.model.embed_tokens.weight, std=1.0)
pos = torch.nn.Parameter(torch.randn(16, 192))
if a.enc == "linear":
    enc = torch.nn.Linear(768, 192)
elif a.enc == "mlp":
    enc = torch.nn.Sequential(torch.nn.Linear(768, 512), torch.nn.GELU(), torch.nn.Linear(512, 192))
else:
    enc = torch.nn.Embedding(7, 192); torch.nn.init.normal_(enc.weight, std=1.0)
params = list(m.parameters()) + [pos] + list(enc.parameters())
opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.01)
v, u = np.mgrid[0:16, 0:16]
def batch_free(rng, B):
    ids, labs, imgs, grids, cells, qs = [], [], [], [], [], []
    V64, U64 = np.mgrid[0:64, 0:64]
    for _ in range(B):
        while True:
            pl = rng.integers(6, 58, (a.K, 2))
            if all(np.linalg.norm(pl[i] - pl[j]) >= 12 for i in range(a.K) for j in range(i)):
                break
        cols = rng.choice(6, a.K, replace=False); q = rng.integers(a.K)
        img = np.full((64, 64, 3), 0.5, np.float32)
        for (x, y), k in zip(pl, cols):
            img[(U64 - x) ** 2 + (V64 - y) ** 2 <= a.r ** 2] = COLS[k]
        patches = img.reshape(4, 16, 4, 16, 3).transpose(0, 2, 1, 3, 4).reshape(16, 768)
        ax, ay = (pl[q] // 16) if a.cell_answer else pl[q]
        seq = [BOS] + [0] * 16 + [Q, WORD + cols[q], WORD + cols[q], NUM + ax, NUM + ay]
        lab = [-100] * 19 + [WORD + cols[q], NUM + ax, NUM + ay]
        ids.append(seq); labs.append(lab); imgs.append(patches); grids.append(np.zeros(16, int)); cells.append(pl); qs.append(q)
    return torch.tensor(ids), torch.tensor(labs), torch.tensor(np.array(imgs)), torch.tensor(np.array(grids)), cells, qs
def batch(rng, B):
    if a.free:
        return batch_free(rng, B)
    ids, labs, imgs, grids, cells, qs = [], [], [], [], [], []
    for _ in range(B):
        cell = rng.choice(16, a.K, replace=False); cols = rng.choice(6, a.K, replace=False); q = rng.integers(a.K)
        img = np.full((16, 16, 16, 3), 0.5, np.float32); grid = np.full(16, 6)
        for c, k in zip(cell, cols):
            cx, cy = 7.5 + rng.integers(-a.jitter, a.jitter + 1), 7.5 + rng.integers(-a.jitter, a.jitter + 1)
            img[c][(u - cx) ** 2 + (v - cy) ** 2 <= a.r ** 2] = COLS[k]; grid[c] = k
        seq = [BOS] + [0] * 16 + [Q, WORD + cols[q], WORD + cols[q], NUM + cell[q] % 4, NUM + cell[q] // 4]
        lab = [-100] * 19 + [WORD + cols[q], NUM + cell[q] % 4, NUM + cell[q] // 4]
        ids.append(seq); labs.append(lab); imgs.append(img.reshape(16, 768)); grids.append(grid); cells.append(cell); qs.append(q)
    return torch.tensor(ids), torch.tensor(labs), torch.tensor(np.array(imgs)), torch.tensor(np.array(grids)), cells, qs
def embeds(ids, img, grid):
    e = m.model.embed_tokens(ids)
    x = enc(grid) if a.enc == "onehot" else enc((img - 0.5) / 0.5)
    return torch.cat([e[:, :1], x + (0 if a.nopos else pos[None]), e[:, 17:]], 1)
held = batch(np.random.default_rng(99), 300)
rng = np.random.default_rng(a.seed); t0 = time.time(); curve = []
for step in range(1, a.steps + 1):
    for g in opt.param_groups: g["lr"] = a.lr * min(1, step / 100)
    ids, lab, img, grid, _, _ = batch(rng, 32)
    loss = m(inputs_embeds=embeds(ids, img, grid), labels=lab).loss
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    if step % a.every == 0:
        with torch.no_grad():
            ids, lab, img, grid, cells, qs = held
            lg = m(inputs_embeds=embeds(ids, img, grid)).logits
            n = ids.shape[1]
            if a.free:  # greedy x, then y given it; named = nearest place is the asked one
                x = lg[:, n - 3, NUM:NUM + 64].argmax(-1)
                ids2 = ids.clone(); ids2[:, n - 2] = NUM + x
                y = m(inputs_embeds=embeds(ids2, img, grid)).logits[:, n - 2, NUM:NUM + 64].argmax(-1)
                pred = torch.stack([x, y], 1).numpy() * (16 if a.cell_answer else 1) + (8 if a.cell_answer else 0)
                acc = float(np.mean([np.linalg.norm(c - p_, axis=1).argmin() == q for c, p_, q in zip(cells, pred, qs)]))
            else:
                cx = lg[:, n - 3, NUM:NUM + 4].argmax(-1)
                truth = torch.tensor([c[q] % 4 for c, q in zip(cells, qs)])
                acc = (cx == truth).float().mean().item()
        curve.append((step, round(acc, 3), round(loss.item(), 3)))
        print(step, f"col acc {acc:.3f} (chance 0.25) loss {loss.item():.3f} {time.time()-t0:.0f}s", flush=True)
print(json.dumps(dict(args=vars(a), curve=curve)))
