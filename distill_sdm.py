"""One-step actions: SDM dual-teacher distillation of the flow action head, and the
consistency-distillation (CD) baseline, from the same script.

    python distill_sdm.py               # SDM: teacher out/stage3 -> one-step student out/sdm
    python distill_sdm.py --method cd   # the CD baseline (ManiCM-style) -> out/cd
    python eval.py success --ckpt out/sdm  # closed-loop success of a student (one step per chunk)

SDM (Jia et al. 2024; DMD / DMD2 for images). Three copies of the teacher's action expert
share ONE frozen VLM prefix per batch:
- G, the generator: noise z at the largest t to an action chunk in one pass, x = D_G(z, 1)
  (at t = 1, model.py's denoiser is exactly one Euler step, so a student is an ordinary
  checkpoint whose config says steps = 1);
- D_real, the frozen teacher: the score of the data distribution;
- D_fake, the unfrozen teacher: trained all along by denoising score matching on G's
  DETACHED samples, so it tracks the score of G's distribution.
With s(x_t) = -(x_t - alpha_t D(x_t, t)) / sigma_t^2, the gradient of KL(p_G,t || p_data,t)
with respect to a sample is s_fake - s_real; G follows it through the mse trick below.
The script talks to the head only through VLA.denoise and model.schedule.
"""
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import data
import model

METHODS = {  # per-method defaults; the command line overrides any of them
    "sdm": dict(out="out/sdm", lr=1e-4, ema=0.0),
    "cd": dict(out="out/cd", lr=1e-4, ema=0.95),
}


@dataclass
class Config:
    method: Literal["sdm", "cd"] = "sdm"  # SDM dual-teacher distillation, or consistency distillation
    teacher: str = "out/stage3"  # the flow-head VLA to distil (its VLM stays frozen)
    data: tuple[str, ...] = ("data/target", "data/source")  # observations to distil on (CD and GAN also use their actions)
    out: str | None = None  # the one-step student's checkpoint folder (method default)
    steps: int = 1500  # optimiser steps of the fake score (SDM) or the student (CD)
    batch: int = 32
    lr: float | None = None  # AdamW learning rate of every trained network (method default)
    warmup: int = 100  # linear learning-rate warm-up steps
    clip: float = 1.0  # gradient-norm clipping
    # dmd2: per-sample mean |x - D_real|; sdm: one scalar, the batch's mean |s_real|. With t mixed in a
    # batch, sdm's scalar weights each sample by ~alpha_t / sigma_t^2, so the low-noise, mode-seeking
    # terms dominate: on the toy mixture of tests/test_distill.py it collapses to one mode, dmd2 does not.
    normaliser: Literal["sdm", "dmd2"] = "dmd2"
    t_sampling: Literal["grid", "range"] = "grid"  # t from the teacher's inference grid, or uniform in t_range
    grid_steps: int = 10  # the teacher's Euler steps (its grid for t, CD's skip unit, the regression target)
    t_range: tuple[float, float] = (0.02, 0.98)
    fake_updates: int = 5  # two time-scale rule: fake-score updates per generator update (DMD2's 5)
    ema: float | None = None  # EMA decay of the student, saved instead of it (CD: its target network); 0 = off
    gan_weight: float = 0.0  # DMD2's adversarial term for G (e.g. 3e-3); 0 = off
    gan_head_weight: float = 1e-2  # the classifier's loss weight on the fake network, when gan_weight > 0
    regress_weight: float = 0.0  # DMD's regression of G(z) onto the teacher's multi-step sample of z; 0 = off
    cd_skip: int = 1  # CD: teacher Euler steps (of 1 / grid_steps) between a point and its target
    log_every: int = 50
    eval_every: int = 500  # probe error of the one-step student against the demonstrations
    seed: int = 0
    overwrite: bool = False  # replace an existing --out
    device: str = "auto"  # auto | cpu | cuda


# ----------------------------------------------------------------------------------------
# The math, on any tensors x of shape (B, ...): action chunks (B, H, D), or toy points (B, 2)
def bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *[1] * (x.dim() - 1))


def diffuse(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = alpha_t x + sigma_t eps (the forward process of the teacher's schedule)."""
    alpha, sigma = model.schedule(bcast(t, x))
    return alpha * x + sigma * eps


def score(x_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """s(x_t) = -(x_t - alpha_t x0_hat) / sigma_t^2 (Tweedie: the score from a denoiser)."""
    alpha, sigma = model.schedule(bcast(t, x_t))
    return -(x_t - alpha * x0_hat) / sigma ** 2


def dm_direction(x, x_t, t, d_real, d_fake, normaliser: str = "sdm") -> torch.Tensor:
    """The distribution-matching direction g, a positive multiple of s_fake - s_real (SDM step 4).
    sdm:  (s_fake - s_real) / mean|s_real|, one scalar for the batch (SDM's code);
    dmd2: (D_fake - D_real) / mean|x - D_real| per sample (DMD2; = (s_fake - s_real) sigma^2/alpha / ...).
    x, x_t, d_real, d_fake: (B, ...); t: (B,)."""
    if normaliser == "sdm":
        s_real = score(x_t, d_real, t)
        return (score(x_t, d_fake, t) - s_real) / s_real.abs().mean()
    dims = tuple(range(1, x.dim()))
    return (d_fake - d_real) / (x - d_real).abs().mean(dims, keepdim=True)


def generator_loss(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """L_G = 0.5 * mse(x, sg(x - g)): d L_G / d x = g / numel, so gradient descent on G moves
    its samples along -g, down KL(p_G || p_data) (DMD2's trick: no Jacobian of the scores)."""
    return 0.5 * F.mse_loss(x, (x - g).detach())


def fake_score_loss(d_fake_xt: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Denoising score matching on generator samples: mse(D_fake(x_t, t), sg(x)). x is detached,
    so no gradient leaks into G (SDM's code forgets this; DMD2 does not)."""
    return F.mse_loss(d_fake_xt, x.detach())


def sample_t(cfg: Config, n: int, device) -> torch.Tensor:
    """t on the teacher's Euler grid {1/N, ..., (N-1)/N} (t = 1 is left out: alpha_1 = 0, so
    both scores are -x_t there and g = 0), or uniform in t_range."""
    if cfg.t_sampling == "grid":
        return torch.randint(1, cfg.grid_steps, (n,), device=device).float() / cfg.grid_steps
    lo, hi = cfg.t_range
    return lo + (hi - lo) * torch.rand(n, device=device)


def teacher_step(d_teacher, x_t: torch.Tensor, t: torch.Tensor, dt: float) -> torch.Tensor:
    """One Euler step of the teacher's ODE from t to t - dt, through its denoiser: v = (x_t - D) / t."""
    return x_t - dt * (x_t - d_teacher(x_t, t)) / bcast(t, x_t)


def cd_loss(d_student, d_target, d_teacher, a, eps, n: torch.Tensor, cfg: Config, mask=None) -> torch.Tensor:
    """Consistency distillation (ManiCM): f(x_tn, t_n) = sg(f_ema(x_tm, t_m)), x_tm = cd_skip teacher
    Euler steps from x_tn, t = n / grid_steps. f is the denoiser D, so f(x, 0) = x holds by itself.
    a, eps: (B, ...) demonstrations and noise; n: (B,) grid indices in [cd_skip, grid_steps]."""
    N, dt = cfg.grid_steps, 1.0 / cfg.grid_steps
    t = n.float() / N
    x_t = diffuse(a, eps, t)
    with torch.no_grad():
        x_m = x_t
        for j in range(cfg.cd_skip):
            x_m = teacher_step(d_teacher, x_m, t - j * dt, dt)
        target = d_target(x_m, t - cfg.cd_skip * dt)
    err = (d_student(x_t, t) - target).pow(2).flatten(2 if mask is not None else 1).mean(-1)
    return (err * mask).sum() / mask.sum() if mask is not None else err.mean()


def update(opt: torch.optim.Optimizer, loss: torch.Tensor, clip: float):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
    opt.step()


def sdm_step(step: int, cfg: Config, generate, d_real, d_fake, opt_g, opt_f, extra_g=None, extra_f=None) -> dict:
    """One SDM step. generate() -> x (B, ...) with gradient into G; d_real, d_fake: (x_t, t) -> x0_hat.
    extra_g(x), extra_f(x): optional added losses (GAN, regression). G moves every fake_updates-th step."""
    logs = {}
    if step % cfg.fake_updates == 0:  # distribution matching: the KL step on G
        x = generate()
        t = sample_t(cfg, len(x), x.device)
        x_t = diffuse(x.detach(), torch.randn_like(x), t)
        with torch.no_grad():
            g = dm_direction(x.detach(), x_t, t, d_real(x_t, t), d_fake(x_t, t), cfg.normaliser)
        loss = generator_loss(x, g) + (extra_g(x) if extra_g else 0.0)
        update(opt_g, loss, cfg.clip)
        logs.update(gen=float(loss.detach()), g_abs=float(g.abs().mean()))
        x = x.detach()
    else:
        with torch.no_grad():
            x = generate()
    t = sample_t(cfg, len(x), x.device)  # score matching: the fake teacher learns G's score
    loss_f = fake_score_loss(d_fake(diffuse(x, torch.randn_like(x), t), t), x) + (extra_f(x) if extra_f else 0.0)
    update(opt_f, loss_f, cfg.clip)
    return dict(logs, fake=float(loss_f.detach()))


def ema_update(ema: nn.Module, net: nn.Module, decay: float):
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), net.parameters()):
            pe.lerp_(p, 1 - decay)


# ----------------------------------------------------------------------------------------
class GanHead(nn.Module):
    """DMD2's discriminator: a linear logit on the fake expert's final features (mean over tokens),
    read with a forward hook so the expert's code stays as it is."""

    def __init__(self, fake: nn.Module, width: int):
        super().__init__()
        self.logit, self.feats = nn.Linear(width, 1), None
        fake.norm.register_forward_hook(lambda mod, inp, out: setattr(self, "feats", out))

    def forward(self, d_fake, x_t, t) -> torch.Tensor:
        d_fake(x_t, t)  # fills self.feats: (B, 1 + H, W)
        return self.logit(self.feats.mean(1)).squeeze(-1)


def extras(cfg: Config, vla: model.VLA, gan: GanHead | None, d_fake, batch: dict, z: torch.Tensor):
    """The optional generator / fake-network losses: extra_g(x), extra_f(x), or None."""
    def noised(x):  # (x_t, t) at a fresh t
        t = sample_t(cfg, len(x), x.device)
        return diffuse(x, torch.randn_like(x), t), t

    terms_g, extra_f = [], None
    if gan is not None:  # non-saturating GAN: noised demonstrations vs noised generator samples (DMD2)
        terms_g.append(lambda x: cfg.gan_weight * F.softplus(-gan(d_fake, *noised(x))).mean())
        extra_f = lambda x: cfg.gan_head_weight * (F.softplus(-gan(d_fake, *noised(batch["actions"]))).mean()  # noqa: E731
                                                   + F.softplus(gan(d_fake, *noised(x))).mean())
    if cfg.regress_weight:  # DMD: G(z) regressed onto the teacher's ODE sample from the same z
        target = vla.sample(batch, cfg.grid_steps, z)
        terms_g.append(lambda x: cfg.regress_weight * F.mse_loss(x, target))
    return (lambda x: sum(f(x) for f in terms_g)) if terms_g else None, extra_f


def observations(sets: list[data.ActionSamples], tok, image_ids, cfg: Config, step: int, stream: int = 0) -> dict:
    """A batch of (image, instruction, proprio, demo chunk) drawn uniformly from the union of
    datasets; fixed by (seed, stream, step): stream 0 trains, stream 1 is the probe."""
    rng = np.random.default_rng([cfg.seed, stream, step])
    sizes = np.cumsum([0] + [len(s) for s in sets])
    picks = rng.integers(sizes[-1], size=cfg.batch)
    samples = []
    for j in picks:
        k = int(np.searchsorted(sizes, j, side="right") - 1)
        samples.append(sets[k](int(j - sizes[k]), rng))
    return data.collate(samples, tok, image_ids)


def main(cfg: Config):
    for k, v in METHODS[cfg.method].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    device = torch.device("cuda" if (torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda") else "cpu")
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise data.DataError(f"{out} exists; pass --overwrite to replace it, or another --out")
    if not (Path(cfg.teacher) / "config.json").is_file():
        raise model.CheckpointError(f"no teacher at {cfg.teacher}: train one (`python train_vla.py --stage 3`) or pass --teacher")
    vla = model.load(cfg.teacher).to(device)
    if vla.cfg.head != "flow":
        raise model.CheckpointError(f"{cfg.teacher} has the {vla.cfg.head!r} head; distillation needs a flow-head teacher")
    vla.requires_grad_(False)  # the VLM and D_real stay frozen
    sets = [data.ActionSamples(data.Dataset(p, image_size=vla.cfg.image_size), vla.cfg.chunk, stats=vla.stats) for p in cfg.data]
    torch.manual_seed(cfg.seed)
    real = vla.expert
    student = copy.deepcopy(real).requires_grad_(True)  # G (SDM) or the consistency function f (CD)
    fake = copy.deepcopy(real).requires_grad_(True)  # SDM's unfrozen teacher
    ema = copy.deepcopy(student).requires_grad_(False) if cfg.ema else None
    gan = GanHead(fake, vla.cfg.expert_width).to(device) if cfg.gan_weight else None
    adamw = lambda ps: torch.optim.AdamW(ps, lr=cfg.lr, betas=(0.95, 0.999), weight_decay=1e-6)  # noqa: E731  SDM's
    opt_g = adamw(student.parameters())
    opt_f = adamw(list(fake.parameters()) + (list(gan.parameters()) if gan else []))
    D = lambda net, kv: lambda x_t, t: vla.denoise(x_t, t, net.project(kv), net)  # noqa: E731  (x_t, t) -> x0_hat
    probe = to(observations(sets, vla.tokenizer, vla.image_ids, cfg, 0, stream=1), device)  # a fixed batch, never trained on
    probe_z = torch.randn(probe["actions"].shape, generator=torch.Generator().manual_seed(cfg.seed)).to(device)

    def probe_error(net) -> float:
        """Masked mse of one-step chunks (or the teacher's grid_steps-step ones) to the demos."""
        with torch.no_grad():
            kv, ones = vla.vlm_kv(probe), torch.ones(len(probe_z), device=device)
            x = vla.denoise(probe_z, ones, net.project(kv), net) if net is not real else vla.sample(probe, cfg.grid_steps, probe_z)
        return float(((x - probe["actions"]).pow(2).mean(-1) * probe["action_mask"]).sum() / probe["action_mask"].sum())

    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.with_name(out.name + ".log.jsonl"), "w", buffering=1)
    start = dict(teacher_probe_mse=probe_error(real), student_probe_mse=probe_error(student))
    print(json.dumps(start))
    log.write(json.dumps(dict(config=asdict(cfg), **start)) + "\n")
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for opt in (opt_g, opt_f):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
        batch = to(observations(sets, vla.tokenizer, vla.image_ids, cfg, step), device)
        with torch.no_grad():
            kv = vla.vlm_kv(batch)  # the VLM runs once; each expert projects its cache
        z = torch.randn_like(batch["actions"])
        ones = torch.ones(len(z), device=device)
        if cfg.method == "cd":
            n = torch.randint(cfg.cd_skip, cfg.grid_steps + 1, (len(z),), device=device)
            loss = cd_loss(D(student, kv), D(ema if ema is not None else student, kv), D(real, kv), batch["actions"], z, n, cfg,
                           batch["action_mask"].float())
            update(opt_g, loss, cfg.clip)
            logs = dict(cd=float(loss.detach()))
        else:
            extra_g, extra_f = extras(cfg, vla, gan, D(fake, kv), batch, z)
            logs = sdm_step(step, cfg, lambda: vla.denoise(z, ones, student.project(kv), student),
                            D(real, kv), D(fake, kv), opt_g, opt_f, extra_g, extra_f)
        if not np.isfinite(list(logs.values())).all():
            raise FloatingPointError(f"non-finite loss {logs} at step {step}; lower --lr (now {cfg.lr}). {out} is untouched.")
        if ema is not None and (cfg.method == "cd" or step % cfg.fake_updates == 0):
            ema_update(ema, student, cfg.ema)
        evaluate = (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1
        if step % cfg.log_every == 0 or evaluate:
            dt = (time.perf_counter() - t0) / (step + 1)
            row = dict(step=step, **logs, lr=opt_g.param_groups[0]["lr"], ms=1000 * dt, samples_s=cfg.batch / dt)
            if evaluate:
                row["student_probe_mse"] = probe_error(ema if ema is not None else student)
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
            log.write(json.dumps(row) + "\n")
    vla.expert, vla.cfg.steps = (ema if ema is not None else student), 1  # the student: the teacher's VLM + the one-step head
    vla.save(out)
    log.close()
    print(f"saved the one-step student to {out}; evaluate it with `python eval.py success --ckpt {out}`")


def to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


if __name__ == "__main__":
    try:
        main(tyro.cli(Config))
    except (ValueError, FloatingPointError) as err:  # bad input, checkpoint or a diverged run
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
