"""One-step actions: SDM dual-teacher distillation of the flow head; the CD baseline.

    python distill_sdm.py               # SDM: teacher out/stage3 -> one-step student out/sdm
    python distill_sdm.py --method cd   # the CD baseline (ManiCM-style) -> out/cd

SDM (Jia et al. 2024; DMD / DMD2 for images): three copies of the teacher's action expert share
ONE frozen VLM prefix per batch. G, the generator, maps noise z at t = 1 to a chunk in one pass,
x = D_G(z, 1) (one Euler step, so a student is a checkpoint whose config says steps = 1); D_real,
the frozen teacher, scores the data; D_fake, trained all along by denoising score matching on G's
detached samples, scores G's distribution. With s(x_t) = -(x_t - alpha_t D(x_t, t)) / sigma_t^2,
the gradient of KL(p_G,t || p_data,t) for a sample is s_fake - s_real; G follows it (mse trick).
"""
import copy, json, time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np, torch, torch.nn as nn, torch.nn.functional as F

import data, etc, model, scaffold

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
    normaliser: Literal["sdm", "dmd2"] = "dmd2"  # g's normaliser (dm_direction); sdm's collapses modes on the toy mixture
    t_sampling: Literal["grid", "range"] = "grid"  # t from the teacher's inference grid, or uniform in t_range
    grid_steps: int = 10  # the teacher's Euler steps (its grid for t, CD's skip unit, the regression target)
    t_range: tuple[float, float] = (0.02, 0.98)
    fake_updates: int = 5  # two time-scale rule: fake-score updates per generator update (DMD2's 5)
    ema: float | None = None  # EMA decay of the student, saved instead of it (CD: its target network); 0 = off
    gan_weight: float = 0.0  # DMD2's adversarial term for G (e.g. 3e-3); 0 = off
    gan_head_weight: float = 1e-2  # the classifier's loss weight on the fake network, when gan_weight > 0
    regress_weight: float = 0.0  # DMD's regression of G(z) onto the teacher's multi-step sample of z; 0 = off
    cd_skip: int = 1  # CD: teacher Euler steps (of 1 / grid_steps) between a point and its target
    log_every: int = 50  # 0 = only the last step
    eval_every: int = 500  # probe error of the one-step student against the demonstrations; 0 = only at the end
    save_every: int = 500  # checkpoint (student + train_state.pt) every so often; 0 = only at the end (and on Ctrl-C)
    seed: int = 0  # fixes the probe and every step's draws
    resume: bool = False  # continue an interrupted run from out/train_state.pt
    overwrite: bool = False  # replace an existing --out
    device: str = "auto"  # auto | cpu | cuda
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # bf16 autocast of the frozen VLM's pass; auto: on CUDA only

# --- The math, on any tensors x of shape (B, ...): action chunks (B, H, D), or toy points (B, 2) ---
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
    sdm:  (s_fake - s_real) / mean|s_real|, one scalar per batch (SDM's code): with t mixed in a batch
          it weights samples by ~alpha_t / sigma_t^2, so low-noise, mode-seeking terms dominate;
    dmd2: (D_fake - D_real) / mean|x - D_real| per sample (DMD2).   x, x_t, d_*: (B, ...); t: (B,)"""
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
        scaffold.update(opt_g, loss, cfg.clip)
        logs.update(gen=float(loss.detach()), g_abs=float(g.abs().mean()))
        x = x.detach()
    else:
        with torch.no_grad():
            x = generate()
    t = sample_t(cfg, len(x), x.device)  # score matching: the fake teacher learns G's score
    loss_f = fake_score_loss(d_fake(diffuse(x, torch.randn_like(x), t), t), x) + (extra_f(x) if extra_f else 0.0)
    scaffold.update(opt_f, loss_f, cfg.clip)
    return dict(logs, fake=float(loss_f.detach()))

def ema_update(ema: nn.Module, net: nn.Module, decay: float):
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), net.parameters()):
            pe.lerp_(p, 1 - decay)

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

def extras(cfg: Config, teacher: model.VLA, gan: GanHead | None, d_fake, batch: dict, z: torch.Tensor):
    """The optional added losses, as functions of G's samples x: (extra_g, extra_f), each or None.
    DMD2's non-saturating GAN (G's term; the classifier's on the fake network, noised demos as
    real) and DMD's regression of G(z) onto the teacher's ODE sample of z."""
    def noised(x):  # (x_t, t) at a fresh t
        t = sample_t(cfg, len(x), x.device)
        return diffuse(x, torch.randn_like(x), t), t
    target = teacher.sample(batch, cfg.grid_steps, z) if cfg.regress_weight else None

    def extra_g(x):
        adversarial = cfg.gan_weight * F.softplus(-gan(d_fake, *noised(x))).mean() if gan else 0.0
        return adversarial + (cfg.regress_weight * F.mse_loss(x, target) if target is not None else 0.0)

    def extra_f(x):
        real = F.softplus(-gan(d_fake, *noised(batch["actions"]))).mean()
        return cfg.gan_head_weight * (real + F.softplus(gan(d_fake, *noised(x))).mean())
    return (extra_g if gan or target is not None else None), (extra_f if gan else None)

def denoiser(vla: model.VLA, expert: nn.Module, prefix: dict):
    """D(x_t, t) -> x0_hat of one copy of the expert, on a VLM prefix computed once per batch."""
    return partial(vla.denoise, prefix=prefix, expert=expert)

def step_seed(seed: int, step: int) -> int:
    """Every random draw of a step comes from this seed: resuming at any step is exact."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])

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
    proc, out = scaffold.start(cfg.device), Path(cfg.out)
    device = proc.device
    scaffold.check_out(out, cfg.resume, cfg.overwrite, cfg.steps, cfg.batch)
    if not (Path(cfg.teacher) / "config.json").is_file():
        raise model.CheckpointError(f"no teacher at {cfg.teacher}: train one (`python train_vla.py --stage 3`) or pass --teacher")
    scaffold.require_trained_head(cfg.teacher, "distil a trained policy (`python train_vla.py --stage 3`)")
    teacher = model.load(cfg.teacher).to(device)  # the VLM and D_real stay frozen
    if teacher.cfg.head != "flow":
        raise model.CheckpointError(f"{cfg.teacher} has the {teacher.cfg.head!r} head; distillation needs a flow-head teacher")
    teacher.requires_grad_(False)
    sets = [data.ActionSamples(data.Dataset(p, image_size=teacher.cfg.image_size), teacher.cfg.chunk, stats=teacher.stats)
            for p in cfg.data]
    sets = [etc.GoalSteps(s) for s in sets] if teacher.cfg.goal_step else sets  # its prefix holds the true goal pixel
    torch.manual_seed(cfg.seed)
    student = model.load(cfg.teacher, steps=1).to(device).requires_grad_(False)  # what is saved: the one-step policy
    real = teacher.expert
    gen = copy.deepcopy(real).requires_grad_(True) if cfg.ema else student.expert.requires_grad_(True)  # G (SDM), f (CD)
    ema = student.expert if cfg.ema else None  # an EMA of G is saved instead of it (CD: the target network)
    fake = copy.deepcopy(real).requires_grad_(True)  # SDM's unfrozen teacher
    gan = GanHead(fake, teacher.cfg.expert_width).to(device) if cfg.gan_weight else None
    opt_g = scaffold.adamw(gen.parameters(), proc, lr=cfg.lr, betas=(0.95, 0.999), weight_decay=1e-6)  # SDM's settings
    opt_f = scaffold.adamw(list(fake.parameters()) + (list(gan.parameters()) if gan else []), proc,
                           lr=cfg.lr, betas=(0.95, 0.999), weight_decay=1e-6)
    states = dict(generator=gen, fake=fake, opt_g=opt_g, opt_f=opt_f)  # what train_state.pt keeps, by name
    states.update({k: v for k, v in (("ema", ema), ("gan", gan)) if v is not None})
    start = scaffold.load_state(out, **states) if cfg.resume else 0
    probe = scaffold.to(observations(sets, teacher.tokenizer, teacher.image_ids, cfg, 0, stream=1), device)  # never trained on
    probe_z = torch.randn(probe["actions"].shape, generator=torch.Generator().manual_seed(cfg.seed)).to(device)

    def probe_error(net) -> float:
        """Masked mse of one-step chunks (or the teacher's grid_steps-step ones) to the demos."""
        with torch.no_grad():
            ones = torch.ones(len(probe_z), device=device)
            x = teacher.sample(probe, cfg.grid_steps, probe_z) if net is real else teacher.denoise(probe_z, ones, teacher.prefix(probe), net)
        return float(((x - probe["actions"]).pow(2).mean(-1) * probe["action_mask"]).sum() / probe["action_mask"].sum())

    log = scaffold.open_log(out, cfg.resume, proc)
    prov = scaffold.provenance("distill_sdm.py", cfg, cfg.teacher, scaffold.action_steps(cfg.teacher), stage="distill",
                               method=cfg.method, datasets=dict(observations=list(cfg.data)))
    if not cfg.resume:
        first = dict(teacher_probe_mse=probe_error(real), student_probe_mse=probe_error(gen))
        print(json.dumps(first))
        scaffold.log(log, dict(config=asdict(cfg), **first), echo=False)

    save = partial(scaffold.save, student, out, cfg, prov, proc, **states)  # save(step)

    done, t0 = start, time.perf_counter()
    try:
        for step in range(start, cfg.steps):
            torch.manual_seed(step_seed(cfg.seed, step))
            for opt in (opt_g, opt_f):
                scaffold.set_lr(opt, scaffold.lr_at(step, cfg.lr, cfg.warmup, cfg.steps, min_ratio=1.0))  # warm-up, then flat
            batch = scaffold.to(observations(sets, teacher.tokenizer, teacher.image_ids, cfg, step), device)
            with torch.no_grad(), scaffold.autocast(proc, cfg.dtype):
                prefix = teacher.prefix(batch)  # the VLM runs once; each expert projects its cache
            z = torch.randn_like(batch["actions"])
            d_real, d_gen = denoiser(teacher, real, prefix), denoiser(teacher, gen, prefix)
            if cfg.method == "cd":
                n = torch.randint(cfg.cd_skip, cfg.grid_steps + 1, (len(z),), device=device)
                d_target = denoiser(teacher, ema, prefix) if ema is not None else d_gen
                loss = cd_loss(d_gen, d_target, d_real, batch["actions"], z, n, cfg, batch["action_mask"].float())
                scaffold.update(opt_g, loss, cfg.clip)
                logs = dict(cd=float(loss.detach()))
            else:
                d_fake = denoiser(teacher, fake, prefix)
                extra_g, extra_f = extras(cfg, teacher, gan, d_fake, batch, z)
                logs = sdm_step(step, cfg, partial(d_gen, z, torch.ones(len(z), device=device)), d_real, d_fake,
                                opt_g, opt_f, extra_g, extra_f)
            scaffold.check_finite(logs, step, cfg.lr, out)
            if ema is not None and (cfg.method == "cd" or step % cfg.fake_updates == 0):
                ema_update(ema, gen, cfg.ema)
            done = step + 1
            evaluate = scaffold.due(done, cfg.eval_every) or done == cfg.steps
            if scaffold.due(step, cfg.log_every) or evaluate:
                dt = (time.perf_counter() - t0) / (done - start)
                row = dict(step=step, **logs, lr=opt_g.param_groups[0]["lr"], ms=1000 * dt, samples_s=cfg.batch / dt)
                if evaluate:
                    row["student_probe_mse"] = probe_error(student.expert)
                scaffold.log(log, row)
            if done < cfg.steps and scaffold.due(done, cfg.save_every):
                save(done)
    except KeyboardInterrupt:
        scaffold.interrupted(save, done, out)
    save(cfg.steps)  # the student: the teacher's VLM + the one-step head, steps = 1 in its config
    log.close()
    print(f"saved the one-step student to {out}; evaluate it with `python eval.py success --ckpt {out}`")

if __name__ == "__main__":
    data.cli(main, Config)
