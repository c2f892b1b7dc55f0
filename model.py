"""The VLA: a Hugging Face vision-language model plus an action head.

Two action heads, chosen by VLAConfig.head:
- "flow": a small transformer (the action expert, as in pi0 / SmolVLA) whose tokens are the
  proprio state and the noisy action chunk. Expert layer i attends to the VLM's keys and
  values of layer feed_layers[i] for the prefix (image + instruction), computed ONCE per
  observation and reused at every denoising step. Trained with flow matching.
- "tokens": actions discretised into bins mapped to reserved tokens, predicted by the VLM's
  own LM head with the next-token loss (the paper's stage-2 head, pi0-FAST style).

Time convention (pi0's), used everywhere in this project:
    t in [0, 1], t = 1 is pure noise;  x_t = (1 - t) a + t eps;  velocity u = eps - a
    alpha_t = 1 - t, sigma_t = t;      x0_hat = x_t - t v
    score(x_t) = -(x_t - alpha_t x0_hat) / sigma_t^2
Distillation talks to the head only through denoise(x_t, t, prefix) -> x0_hat and
schedule(t) -> (alpha_t, sigma_t), so it does not depend on how the head was trained.
"""
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_model, save_model

import data
import sim

FORMAT = "bridgevla-vla-1"


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not fit this code; the message names the fix."""


@dataclass
class VLAConfig:
    vlm: str = "tiny"  # "tiny" (random Idefics3, offline) or a local path / hub id of an image-text-to-text model
    image_size: int = 64  # images are resized to the vision tower's size; this is the data's size
    head: Literal["flow", "tokens"] = "flow"  # action head: flow-matching expert or action tokens
    chunk: int = 8  # actions predicted per observation
    action_dim: int = 4
    proprio_dim: int = 4
    expert_width: int = 128  # the action expert's hidden size
    expert_heads: int = 4
    expert_mlp: int = 256
    feed_layers: tuple[int, ...] = ()  # VLM layers whose prefix KV feed expert layers 0, 1, ...; () = all
    freeze_vision: bool = False  # freeze the vision tower (the paper's ablation)
    insulate: bool = False  # knowledge insulation (pi0.5): no gradient from the expert into the VLM
    bins: int = 256  # action-token bins over [-token_range, token_range] of normalised values
    token_range: float = 3.0
    steps: int = 10  # Euler steps when sampling; a distilled one-step student saves 1
    vlm_config: dict = field(default_factory=dict)  # filled in: the VLM's own config, for loading


# ----------------------------------------------------------------------------------------
# The VLM: tiny offline Idefics3, or any pretrained AutoModelForImageTextToText
def tiny_tokenizer(n_action_tokens: int, vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained offline with `tokenizers` (about a second) on every
    instruction and paraphrase in every colour, the ETC vocabulary and pixel numbers. Any text
    still encodes (all 256 bytes are in it); the merges make our prompts ~3x shorter, and the
    sequence length is most of the step time."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<bos>", "<eos>", "<image>"] + [f"<act{i}>" for i in range(n_action_tokens)]
    corpus = [t for task in sim.TASKS for c in [None, *sim.PALETTE] for t in sim.instructions(task, c, "all")]
    corpus += list(data.ETC_WORDS) + list(data.PHASES) + [f"{i} {j}, " for i in range(128) for j in range(0, 128, 7)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size + len(specials), special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", additional_special_tokens=specials[3:])


def tiny_vlm_config(vocab_size: int, image_token_id: int, image_size: int) -> dict:
    """SmolVLM's architecture (Idefics3) at toy size: 64 px, patch 8, pixel shuffle 2 -> 16 tokens."""
    return dict(model_type="idefics3", scale_factor=2, image_token_id=image_token_id,
                vision_config=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=256, image_size=image_size, patch_size=8),
                text_config=dict(model_type="llama", hidden_size=192, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=4, intermediate_size=512,
                                 vocab_size=vocab_size, max_position_embeddings=1024,
                                 tie_word_embeddings=False))


def build_vlm(cfg: VLAConfig, tokenizer=None):
    """(vlm, tokenizer). A saved vlm_config rebuilds the architecture with no download."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer
    if cfg.vlm_config:  # loading a checkpoint: architecture from its config, weights follow
        vc = dict(cfg.vlm_config)
        return AutoModelForImageTextToText.from_config(AutoConfig.for_model(**vc)), tokenizer
    if cfg.vlm == "tiny":
        tokenizer = tiny_tokenizer(cfg.bins)
        vc = tiny_vlm_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"), cfg.image_size)
        vlm = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**vc))
    else:  # a real checkpoint (e.g. HuggingFaceTB/SmolVLM-256M-Instruct) by path or hub id
        vlm = AutoModelForImageTextToText.from_pretrained(cfg.vlm)
        tokenizer = AutoTokenizer.from_pretrained(cfg.vlm)
        tokenizer.add_tokens([f"<act{i}>" for i in range(cfg.bins)], special_tokens=True)  # reserved action tokens
        vlm.resize_token_embeddings(len(tokenizer))
    cfg.vlm_config = vlm.config.to_dict()
    return vlm, tokenizer


def image_token_ids(vc, tokenizer) -> list[int]:
    """The ids that stand for one image in a prompt, as Idefics3 / SmolVLM's processor lays
    them out for a single un-split image: [<fake_token_around_image> <global-img>]
    <image> x n [<fake_token_around_image>], n = (size / patch)^2 / shuffle^2. The tiny
    tokenizer has no wrapper tokens, so it gets the bare <image> block."""
    n = (vc.vision_config.image_size // vc.vision_config.patch_size) ** 2 // vc.scale_factor ** 2
    vocab = tokenizer.get_vocab()
    wrap = [vocab[t] for t in ("<fake_token_around_image>", "<global-img>") if t in vocab]
    return wrap + [vc.image_token_id] * n + wrap[:1]


def global_loss(terms: dict, weights: dict, world: int = 1) -> tuple[torch.Tensor, dict]:
    """sum_k w_k * (global sum_k / global count_k) over {name: (sum, count)} from VLA.forward.
    DDP averages gradients over processes, so the local part is scaled by `world`; the
    counts are all-reduced first. Also returns each term's global mean, for logging."""
    loss, logs = 0.0, {}
    for name, w in weights.items():
        s, n = terms.get(name, (torch.zeros(()), torch.zeros(())))
        stats = torch.stack([s.detach().float().cpu(), n.float().cpu()])
        if world > 1:
            torch.distributed.all_reduce(stats)
        if stats[1] > 0:
            loss = loss + w * s * world / stats[1]
            logs[name] = (stats[0] / stats[1]).item()
    return loss, logs


def kv_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values), each (B, kv_heads, L, head_dim), from a transformers cache."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers < 4.56


# ----------------------------------------------------------------------------------------
# Flow matching: the math, in small functions
def schedule(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of the rectified-flow path x_t = alpha_t a + sigma_t eps."""
    return 1.0 - t, t


def flow_target(a: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = (1 - t) a + t eps and the velocity u = eps - a.   a, eps: (B, H, D); t: (B,)"""
    t = t[:, None, None]
    return (1 - t) * a + t * eps, eps - a


def flow_sums(v: torch.Tensor, u: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over valid steps of ||v - u||^2 / D, number of valid steps)  (pi0 eq. 1).
    v, u: (B, H, D); mask: (B, H), 0 on steps padded past the episode's end."""
    return ((v - u).pow(2).mean(-1) * mask).sum(), mask.sum()


def flow_loss(v: torch.Tensor, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    s, n = flow_sums(v, u, mask)
    return s / n.clamp(min=1)


def next_token_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy of token i+1 given tokens <= i, number of labelled tokens).
    logits: (B, L, V); labels: (B, L), -100 where no loss is taken."""
    target = labels[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100, reduction="sum")
    return ce, (target != -100).sum()


def sample_time(u: torch.Tensor) -> torch.Tensor:
    """Uniform u in [0, 1) -> pi0's t ~ Beta(1.5, 1) on [0.001, 1]: more weight on the noisier half."""
    return 0.999 * u.pow(1 / 1.5) + 0.001  # inverse CDF of Beta(1.5, 1) is u^(1/1.5)


def euler(velocity, x1: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = 1 (noise) to t = 0 (actions) in num_steps steps."""
    x, dt = x1, -1.0 / num_steps
    for k in range(num_steps):
        t = torch.full((x.shape[0],), 1.0 - k / num_steps, device=x.device, dtype=x.dtype)
        x = x + dt * velocity(x, t)
    return x


def time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """pi0's sinusoidal embedding of t in [0, 1]: (B,) -> (B, dim), periods geometric in
    [min_period, max_period] so that small differences in t stay visible."""
    frac = torch.linspace(0, 1, dim // 2, device=t.device)
    period = min_period * (max_period / min_period) ** frac
    ang = t[:, None].float() * (2 * math.pi / period)[None]  # (B, dim/2)
    return torch.cat([ang.sin(), ang.cos()], -1).to(t.dtype)


# ----------------------------------------------------------------------------------------
# The action expert
class ExpertLayer(nn.Module):
    """Pre-norm transformer layer whose queries see the prefix KV of one VLM layer.

    Keys/values = [projected VLM prefix keys/values ; the expert's own]. The expert tokens
    attend to each other fully and to every non-padding prefix token; the prefix never sees
    them, so its KV can be computed once per observation."""

    def __init__(self, width: int, heads: int, mlp: int, vlm_kv_dim: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.prefix_k, self.prefix_v = nn.Linear(vlm_kv_dim, width), nn.Linear(vlm_kv_dim, width)
        self.out = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp), nn.GELU(), nn.Linear(mlp, width))

    def project_prefix(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VLM cache (B, kvh, L, hd) -> expert heads (B, heads, L, width/heads)."""
        B, _, L, _ = k.shape
        flat = lambda x: x.transpose(1, 2).reshape(B, L, -1)  # noqa: E731
        split = lambda x: x.view(B, L, self.heads, -1).transpose(1, 2)  # noqa: E731
        return split(self.prefix_k(flat(k))), split(self.prefix_v(flat(v)))

    def forward(self, x: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, pmask: torch.Tensor) -> torch.Tensor:
        """x: (B, S, W) expert tokens; pk, pv: (B, h, L, W/h); pmask: (B, L) bool, True = real."""
        B, S, W = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)  # (B, h, L + S, W/h)
        mask = torch.cat([pmask, pmask.new_ones(B, S)], 1)[:, None, None, :]  # (B, 1, 1, L + S)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.out(a.transpose(1, 2).reshape(B, S, W))
        return x + self.mlp(self.norm2(x))


class ActionExpert(nn.Module):
    """Tokens [state, a_1 .. a_H] -> velocity for a_1 .. a_H."""

    def __init__(self, cfg: VLAConfig, n_layers: int, vlm_kv_dim: int):
        super().__init__()
        W = cfg.expert_width
        self.state_in = nn.Linear(cfg.proprio_dim, W)
        self.action_in = nn.Linear(cfg.action_dim, W)
        self.time_mlp = nn.Sequential(nn.Linear(2 * W, W), nn.SiLU(), nn.Linear(W, W))  # pi0: MLP([a; tau])
        self.pos = nn.Parameter(torch.randn(cfg.chunk + 1, W) * 0.02)
        self.layers = nn.ModuleList([ExpertLayer(W, cfg.expert_heads, cfg.expert_mlp, vlm_kv_dim) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(W)
        self.action_out = nn.Linear(W, cfg.action_dim)

    def project(self, vlm_kv: dict) -> dict:
        """VLA.vlm_kv's VLM cache -> this expert's prefix keys/values (distillation runs the VLM once, projects it 3x)."""
        kv = [layer.project_prefix(k, v) for layer, (k, v) in zip(self.layers, vlm_kv["kv"])]
        return {**vlm_kv, "kv": kv}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, state: torch.Tensor, prefix: dict) -> torch.Tensor:
        """x_t: (B, H, D) noisy chunk; t: (B,); state: (B, P); prefix from VLA.prefix -> (B, H, D)."""
        a = self.action_in(x_t)
        tau = time_embedding(t, a.shape[-1])[:, None].expand_as(a)
        h = torch.cat([self.state_in(state)[:, None], self.time_mlp(torch.cat([a, tau], -1))], 1) + self.pos
        for layer, (pk, pv) in zip(self.layers, prefix["kv"]):
            h = layer(h, pk, pv, prefix["mask"])
        return self.action_out(self.norm(h[:, 1:]))


# ----------------------------------------------------------------------------------------
class VLA(nn.Module):
    def __init__(self, cfg: VLAConfig, tokenizer=None, stats: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.vlm, self.tokenizer = build_vlm(cfg, tokenizer)
        self.stats = stats or {}  # normalisation stats of the data the policy was trained on
        self.warming_up = False  # set by the trainer while a fresh expert must not move the VLM
        tc = self.vlm.config.text_config
        n_vlm = tc.num_hidden_layers
        cfg.feed_layers = tuple(cfg.feed_layers) or tuple(range(n_vlm))
        if not all(0 <= i < n_vlm for i in cfg.feed_layers):
            raise ValueError(f"--feed-layers must lie in 0..{n_vlm - 1}, got {cfg.feed_layers}")
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        kv_dim = tc.num_key_value_heads * head_dim  # width of one layer's cached keys
        self.expert = ActionExpert(cfg, len(cfg.feed_layers), kv_dim) if cfg.head == "flow" else None
        self.act0 = self.tokenizer.convert_tokens_to_ids("<act0>")
        self.image_ids = image_token_ids(self.vlm.config, self.tokenizer)
        if cfg.freeze_vision:
            self.vlm.model.vision_model.requires_grad_(False)

    # -- inputs --------------------------------------------------------------------------
    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 1, 3, S, S) in [-1, 1] at the vision tower's size S."""
        x = images.permute(0, 3, 1, 2).float() / 255.0
        S = self.vlm.config.vision_config.image_size
        if x.shape[-1] != S:
            x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False)
        dtype = next(self.vlm.parameters()).dtype
        return ((x - 0.5) / 0.5)[:, None].to(dtype)  # SigLIP / Idefics3 normalisation

    def to_bins(self, a: torch.Tensor) -> torch.Tensor:
        """Normalised values -> bin index in [0, bins): uniform bins over [-range, range]."""
        r = self.cfg.token_range
        return ((a.clamp(-r, r) + r) / (2 * r) * self.cfg.bins).long().clamp(max=self.cfg.bins - 1)

    def from_bins(self, b: torch.Tensor) -> torch.Tensor:
        r = self.cfg.token_range
        return (b.float() + 0.5) / self.cfg.bins * 2 * r - r  # bin centres

    def batch_from(self, images, texts: list[str], proprio=None, answers=None) -> dict:
        """Tokenised batch (right-padded) via data.collate, on the model's device."""
        samples = [dict(image=im, text=tx) for im, tx in zip(images.cpu().numpy(), texts)]
        for s, a in zip(samples, answers or []):
            s["answer"] = a
        b = data.collate(samples, self.tokenizer, self.image_ids)
        if proprio is not None:
            b["proprio"] = proprio
        return {k: v.to(self.device) for k, v in b.items()}

    device = property(lambda self: next(self.parameters()).device)

    # -- the prefix ----------------------------------------------------------------------
    def prefix(self, batch: dict) -> dict:
        """Run the VLM once over image + prompt; the expert's keys/values of its cache."""
        return self.expert.project(self.vlm_kv(batch))

    def vlm_kv(self, batch: dict) -> dict:
        """The VLM's cached keys/values of the layers that feed the expert, the prompt mask and state."""
        out = self.vlm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             pixel_values=self.pixels(batch["images"]), use_cache=True)
        kv = [kv_layers(out.past_key_values)[i] for i in self.cfg.feed_layers]
        if self.cfg.insulate or self.warming_up:  # no action gradient into the VLM (pi0.5's insulation)
            kv = [(k.detach(), v.detach()) for k, v in kv]
        return dict(kv=kv, mask=batch["attention_mask"].bool(), state=batch["proprio"])

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, prefix: dict, expert=None) -> torch.Tensor:
        """x0_hat = x_t - t v(x_t, t): the denoiser interface distillation uses (with its own
        expert copies; prefix from that expert's project). At t = 1 this is one Euler step."""
        return x_t - t[:, None, None] * (expert or self.expert)(x_t, t, prefix["state"], prefix)

    # -- losses --------------------------------------------------------------------------
    def forward(self, etc: dict | None = None, act: dict | None = None, generator=None) -> dict:
        """Summed loss terms and their counts, {name: (sum, count)}: 'lm' for an ETC batch,
        'flow' or 'tokens' for an action batch. Sums (not means) let a trainer normalise by
        the global count, so that DDP over any number of processes equals one process."""
        out = {}
        if etc is not None:  # ETC: next-token loss on the answer tokens only
            logits = self.vlm(input_ids=etc["input_ids"], attention_mask=etc["attention_mask"],
                              pixel_values=self.pixels(etc["images"])).logits
            out["lm"] = next_token_sums(logits, etc["labels"])
        if act is not None and self.cfg.head == "tokens":
            out["tokens"] = self.token_sums(act)
        elif act is not None:  # noise and time come with the batch when data.Batches drew them
            a = act["actions"]
            eps = act["noise"] if "noise" in act else torch.randn(a.shape, generator=generator, device=a.device)
            u = act["time_u"] if "time_u" in act else torch.rand(a.shape[0], generator=generator, device=a.device)
            eps, t = eps.to(a.dtype), sample_time(u).to(a.dtype)
            x_t, u = flow_target(a, eps, t)
            v = self.expert(x_t, t, act["proprio"], self.prefix(act))
            out["flow"] = flow_sums(v, u, act["action_mask"].to(v.dtype))
        return out

    def loss(self, batch: dict, generator=None) -> dict:
        """Mean loss of one batch (ETC or action), for tests and quick use; 'loss' to backprop."""
        terms = self(**{"act" if "actions" in batch else "etc": batch}, generator=generator)
        means = {k: s / n.clamp(min=1) for k, (s, n) in terms.items()}
        return dict(loss=sum(means.values()), **{k: m.detach() for k, m in means.items()})

    def action_token_ids(self, actions: torch.Tensor) -> torch.Tensor:
        return self.to_bins(actions).flatten(1) + self.act0  # (B, H*D)

    def token_sums(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the chunk's action tokens (+ eos) to each prompt; next-token loss on them."""
        ids, att, lab = batch["input_ids"], batch["attention_mask"], batch["labels"]
        acts = self.action_token_ids(batch["actions"])
        valid = batch["action_mask"].repeat_interleave(self.cfg.action_dim, 1)  # padded steps: no loss
        B, L = ids.shape
        n = att.sum(1)  # prompt lengths; insert the actions right after each prompt
        width = L + acts.shape[1] + 1
        new_ids = ids.new_full((B, width), self.tokenizer.pad_token_id)
        new_att, new_lab = att.new_zeros((B, width)), lab.new_full((B, width), -100)
        for i in range(B):
            seq = torch.cat([ids[i, :n[i]], acts[i], ids.new_tensor([self.tokenizer.eos_token_id])])
            new_ids[i, :len(seq)], new_att[i, :len(seq)] = seq, 1
            new_lab[i, n[i]:n[i] + acts.shape[1]] = torch.where(valid[i], acts[i], -100)
            new_lab[i, n[i] + acts.shape[1]] = self.tokenizer.eos_token_id
        logits = self.vlm(input_ids=new_ids, attention_mask=new_att, pixel_values=self.pixels(batch["images"])).logits
        return next_token_sums(logits, new_lab)

    # -- inference -----------------------------------------------------------------------
    @torch.no_grad()
    def predict_action_chunk(self, images, instructions: list[str], proprio: torch.Tensor,
                             num_steps: int | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised action chunks (B, H, D); proprio is normalised too. The prefix runs once;
        num_steps defaults to the checkpoint's own (10 for a teacher, 1 for a student)."""
        batch = self.batch_from(images, [s if s.endswith("\n") else s + "\n" for s in instructions], proprio.to(self.device))
        return self.sample(batch, num_steps, noise)

    @torch.no_grad()
    def sample(self, batch: dict, num_steps: int | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Action chunks for a collated batch: one prefix pass, then num_steps expert passes."""
        B, H, D = batch["input_ids"].shape[0], self.cfg.chunk, self.cfg.action_dim
        if self.cfg.head == "tokens":
            return self.from_bins(self.generate(batch, H * D, actions=True) - self.act0).view(B, H, D)
        prefix = self.prefix(batch)
        x1 = noise if noise is not None else torch.randn(B, H, D, device=self.device)
        return euler(lambda x, t: self.expert(x, t, prefix["state"], prefix), x1.to(self.device), num_steps or self.cfg.steps)

    @torch.no_grad()
    def act(self, images: torch.Tensor, instructions: list[str], proprio, num_steps: int | None = None):
        """Control: raw proprio (B, P) -> raw actions (B, H, D) in [-1, 1], via the stats."""
        p, a = self.stats["proprio"], self.stats["actions"]
        proprio = torch.as_tensor((np.asarray(proprio) - p["mean"]) / p["std"], dtype=torch.float32)
        chunk = self.predict_action_chunk(images, instructions, proprio, num_steps).float().cpu().numpy()
        return np.clip(chunk * a["std"] + a["mean"], -1, 1)

    @torch.no_grad()
    def etc_scores(self, recs: list[tuple], batch: int = 32) -> dict:
        """Greedy answers to (dataset, record) pairs, scored per level by data.etc_scores."""
        was_training, preds = self.training, []
        self.eval()
        for i in range(0, len(recs), batch):
            part = recs[i:i + batch]
            images = torch.from_numpy(np.stack([ds.arrays[r["task"]]["images"][r["frame"]] for ds, r in part]))
            preds += self.answer(images, [r["question"] for _, r in part])
        self.train(was_training)
        return data.etc_scores([r for _, r in recs], preds)

    @torch.no_grad()
    def generate(self, batch: dict, max_new: int, actions: bool = False) -> torch.Tensor:
        """Greedy decoding with the KV cache. actions=True restricts it to action tokens."""
        ids, att = batch["input_ids"], batch["attention_mask"]
        B, n = ids.shape[0], att.sum(1)
        pos = (att.cumsum(1) - 1).clamp(min=0)
        out = self.vlm(input_ids=ids, attention_mask=att, pixel_values=self.pixels(batch["images"]),
                       position_ids=pos, use_cache=True)
        logits, cache = out.logits[torch.arange(B), n - 1], out.past_key_values
        new, done = [], torch.zeros(B, dtype=torch.bool, device=ids.device)
        for _ in range(max_new):
            if actions:
                logits = logits[:, self.act0:self.act0 + self.cfg.bins]
            tok = logits.argmax(-1) + (self.act0 if actions else 0)
            tok = torch.where(done, self.tokenizer.pad_token_id, tok)
            new.append(tok)
            done |= tok == self.tokenizer.eos_token_id
            if done.all():
                break
            att = torch.cat([att, att.new_ones(B, 1)], 1)
            out = self.vlm(input_ids=tok[:, None], attention_mask=att, past_key_values=cache,
                           position_ids=n[:, None] + len(new) - 1, use_cache=True)
            logits, cache = out.logits[:, -1], out.past_key_values
        return torch.stack(new, 1)

    @torch.no_grad()
    def answer(self, images, questions: list[str], max_new: int = 32) -> list[str]:
        """Greedy answers to ETC questions, in the prompt format training uses."""
        batch = self.batch_from(images, [f"question: {q}\nanswer: " for q in questions])
        eos = self.tokenizer.eos_token_id
        return [self.tokenizer.decode(row[:row.index(eos)] if eos in row else row) for row in self.generate(batch, max_new).tolist()]

    # -- checkpoints ---------------------------------------------------------------------
    def save(self, path: str | Path, train_state: dict | None = None):
        """A folder loadable without training state (plus train_state.pt, for exact resume,
        when given); written to a temporary name, then renamed over the old one."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(self, str(tmp / "model.safetensors"))
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        (tmp / "config.json").write_text(json.dumps(dict(format=FORMAT, vla=asdict(self.cfg)), indent=1))
        (tmp / "stats.json").write_text(json.dumps(self.stats, indent=1))
        self.tokenizer.save_pretrained(tmp)
        data.replace_dir(tmp, path)


def load(path: str | Path, expect: dict | None = None) -> VLA:
    """Rebuild a VLA from a checkpoint folder; `expect` fields must match its config."""
    from transformers import PreTrainedTokenizerFast
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise CheckpointError(f"no checkpoint at {path} (config.json + model.safetensors); train one first")
    meta = json.loads((path / "config.json").read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (format {meta.get('format')!r})")
    vla = {**meta["vla"], "feed_layers": tuple(meta["vla"]["feed_layers"])}
    for k, v in (expect or {}).items():
        if vla.get(k) != v:
            raise CheckpointError(f"{path} has {k}={vla.get(k)!r}, expected {v!r}: use a matching checkpoint")
    model = VLA(VLAConfig(**vla), PreTrainedTokenizerFast.from_pretrained(path), json.loads((path / "stats.json").read_text()))
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except RuntimeError as err:  # shapes differ
        raise CheckpointError(f"{path}/model.safetensors does not fit this architecture: "
                              f"{next((ln.strip() for ln in str(err).splitlines() if 'size mismatch' in ln), err)}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit this architecture (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); it was saved by other code")
    return model.eval()

