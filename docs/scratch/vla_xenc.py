"""Bisection: the VLA's language model (model.VLA, the project's tokenizer, data.collate, the disc probe's
samples and wording) with its image tokens replaced by xpix.py's encoder: 16 px patches -> Linear + a learned
per-token position (--enc xpix), the VLA's own vision tower and connector (--enc vla), or those followed by
xpix's learned position (--enc vla_pos); the tower's pieces are flags (--patch, --shuffle, --vis_layers, --pos_std,
--post_ln 0: no post-LayerNorm, --conn_std / --conv_std: the connector's / patch embedding's initial std,
--fanin 1: tower and connector at std 1/sqrt(fan_in), --vis_lr: its learning rate as a fraction of --lr). Named: greedy x,
then y given it (the colour word teacher-forced), nearest disc is the asked one (chance 1/3).
The flags rebuild the tower as the notes' rows ran it, whatever model.py's tiny default is now (from 9dd63f5 the cut
tower at fan-in scale): by default the tower as built before it (8 px, shuffle 2, 2 layers, post-LayerNorm, every map and
the position at transformers' std 0.02). The random streams are not those of the rows' own runs."""
import argparse, sys, time
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]  # the repository
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "experiments"))
import numpy as np, torch
import binding, data, etc, model
p = argparse.ArgumentParser()
p.add_argument("--enc", default="xpix"); p.add_argument("--steps", type=int, default=2000)
p.add_argument("--vis_layers", type=int, default=2)
p.add_argument("--every", type=int, default=250); p.add_argument("--seed", type=int, default=0)
p.add_argument("--nopos", type=int, default=0); p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--pos_std", type=float, default=0.02)
p.add_argument("--patch", type=int, default=8); p.add_argument("--shuffle", type=int, default=2)
p.add_argument("--post_ln", type=int, default=1); p.add_argument("--conn_std", type=float, default=0)
p.add_argument("--vis_lr", type=float, default=1.0); p.add_argument("--k", type=int, default=3)  # discs per image
p.add_argument("--conv_std", type=float, default=0)  # the patch embedding's initial std (transformers': 0.02)
p.add_argument("--fanin", type=int, default=0)  # 1: every Linear / Conv2d of the tower and connector at std 1/sqrt(fan_in)
a = p.parse_args()
torch.set_num_threads(1); torch.manual_seed(a.seed)
cfg = binding.Config(probe="discs")
_orig = model.tiny_vlm_config
def _tower(*x, **k):  # the tiny vision tower with the flags' layers, patch and pixel shuffle
    c = _orig(*x, **k); c["scale_factor"] = a.shuffle; c["vision_config"]["patch_size"] = a.patch
    c["vision_config"]["num_hidden_layers"] = a.vis_layers
    return c
model.tiny_vlm_config = _tower
vla = model.VLA(model.VLAConfig(), corpus=etc.corpus() + [etc.prompt(f"where is the {w} disc?") for w in binding.COLORS])
tok, lm = vla.tokenizer, vla.vlm
# SigLIP's position embedding (transformers' init: std ~0.02 against patch features ~1)
torch.nn.init.normal_(lm.model.vision_model.embeddings.position_embedding.weight, std=a.pos_std)
if a.post_ln:  # model.VLA drops it from the tiny tower; put SigLIP's back
    lm.model.vision_model.post_layernorm = torch.nn.LayerNorm(lm.config.vision_config.hidden_size, eps=lm.config.vision_config.layer_norm_eps)
assert len(vla.image_ids) == 16, vla.image_ids
for mod in [*lm.model.vision_model.modules(), *lm.model.connector.modules()]:  # transformers' std 0.02, or fan-in
    if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
        torch.nn.init.normal_(mod.weight, std=mod.weight[0].numel() ** -0.5 if a.fanin else 0.02)
if a.conv_std:
    torch.nn.init.normal_(lm.model.vision_model.embeddings.patch_embedding.weight, std=a.conv_std)
if a.conn_std:  # the connector's initial scale (transformers': std 0.02, image tokens of norm ~3 against ~14 for text)
    torch.nn.init.normal_(lm.model.connector.modality_projection.proj.weight, std=a.conn_std)
print("vision pos-emb std", lm.model.vision_model.embeddings.position_embedding.weight.std().item(), flush=True)
enc, pos = torch.nn.Linear(768, 192), torch.nn.Parameter(torch.randn(16, 192))
img_id = lm.config.image_token_id
nums = torch.tensor([tok.convert_tokens_to_ids(f"Ġ{i}") for i in range(64)])
assert (nums != tok.unk_token_id).all() if tok.unk_token_id is not None else True
vis = [q for n, q in lm.named_parameters() if ".vision_model." in n]
rest = [q for n, q in lm.named_parameters() if ".vision_model." not in n] + {"vla": [], "vla_pos": [pos]}.get(a.enc, list(enc.parameters()) + [pos])
params = vis + rest
opt = torch.optim.AdamW([dict(params=vis, s=a.vis_lr), dict(params=rest, s=1.0)], lr=a.lr, betas=(0.9, 0.95), weight_decay=0.01)
def logits(batch):
    if a.enc == "vla_pos":  # the tower and connector, then a learned per-token position
        e = lm.get_input_embeddings()(batch["input_ids"]).clone()
        f = lm.model.get_image_features(pixel_values=model.pixels(lm, batch["images"]))
        f = torch.cat(f.pooler_output)  # (B * 16, 192)
        e[batch["input_ids"] == img_id] = (f.reshape(-1, 16, 192) + pos).reshape(-1, 192).to(e.dtype)
        return lm(inputs_embeds=e, attention_mask=batch["attention_mask"]).logits
    if a.enc == "vla":
        return lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=model.pixels(lm, batch["images"])).logits
    x = (batch["images"].float() / 127.5 - 1).view(-1, 4, 16, 4, 16, 3).permute(0, 1, 3, 2, 4, 5).reshape(-1, 16, 768)
    e = lm.get_input_embeddings()(batch["input_ids"]).clone()
    e[batch["input_ids"] == img_id] = (enc(x) + (0 if a.nopos else pos)).reshape(-1, 192)
    return lm(inputs_embeds=e, attention_mask=batch["attention_mask"]).logits
def draw(rng, n):
    return [binding.disc_sample(cfg, rng, a.k) for _ in range(n)]
held = draw(np.random.default_rng([a.seed, 1]), 300)
hb = data.collate([s for s, _, _ in held], tok, vla.image_ids)
t0 = time.time()
for step in range(1, a.steps + 1):
    for g in opt.param_groups: g["lr"] = g["s"] * a.lr * min(1, step / 100)
    b = data.collate([s for s, _, _ in draw(np.random.default_rng([a.seed, 0, step]), 32)], tok, vla.image_ids)
    loss = model.next_token_sums(logits(b), b["labels"]); loss = loss[0] / loss[1]
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    if step % a.every == 0:
        with torch.no_grad():
            L = hb["labels"]; first = (L != -100).int().argmax(1)  # the restated word's position; x next, then y
            r = torch.arange(len(L))
            lg = logits(hb)
            x = lg[r, first, :][:, nums].argmax(-1)
            ids2 = hb["input_ids"].clone(); ids2[r, first + 1] = nums[x]
            y = logits({**hb, "input_ids": ids2})[r, first + 1, :][:, nums].argmax(-1)
            d = [np.linalg.norm(pl - np.array([xx, yy]), axis=1) for (_, pl, _), xx, yy in zip(held, x.tolist(), y.tolist())]
            named = np.mean([di.argmin() == q for di, (_, _, q) in zip(d, held)])
            px4 = np.mean([di[q] <= 4 for di, (_, _, q) in zip(d, held)])  # within 4 px of the asked disc
        print(step, f"named {named:.3f} px4 {px4:.3f} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
