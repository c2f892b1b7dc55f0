"""Stages 2 and 3 of ETC bridging: Objective Bridging and Retentive Adaptation.

    python train_vla.py --stage 2          # from out/stage1: actions co-trained with ETC
    python train_vla.py --stage 3          # from out/stage2: few target demos + target/OOD ETC
    torchrun --nproc_per_node=2 train_vla.py --stage 2     # the same, with PyTorch DDP

Baselines are flags on the same loop: --init base (direct fine-tuning of the VLM, no
stage 1), --etc-start 0 --etc-end 0 (action only), --levels scene (a subset of ETC levels),
--head tokens, --freeze-vision, --insulate. Every loss is a sum over the global batch divided
by its global count, so N processes give the same loss and gradients as one.
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import tyro

import data
import model
import sim

# Stage defaults; any of them can be overridden on the command line.
STAGES = {
    2: dict(action_data="data/source", etc_data=("data/source",), init="out/stage1", out="out/stage2",
            steps=3000, lr=5e-4, etc_start=0.5, etc_end=0.2, expert_warmup=200),
    3: dict(action_data="data/target", etc_data=("data/target", "data/ood"), init="out/stage2", out="out/stage3",
            steps=800, lr=1e-4, etc_start=0.3, etc_end=0.3, expert_warmup=0),
}


@dataclass
class Config:
    stage: Literal[2, 3] = 2  # 2: Objective Bridging, 3: Retentive Adaptation
    action_data: str | None = None  # the action dataset (stage default)
    etc_data: tuple[str, ...] | None = None  # datasets whose etc.jsonl is co-trained (stage default)
    init: str | None = None  # checkpoint to start from; 'base' = the base VLM (direct fine-tuning)
    out: str | None = None  # output checkpoint folder (stage default)
    vlm: str = "tiny"  # with --init base: the VLM to start from
    head: Literal["flow", "tokens"] = "flow"  # action head
    steps: int | None = None  # optimiser steps (stage default)
    batch: int = 32  # global batch (ETC + action samples)
    lr: float | None = None  # peak learning rate (stage default)
    warmup: int = 100  # linear learning-rate warm-up steps, then cosine to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0  # gradient-norm clipping
    etc_start: float | None = None  # ETC fraction of the batch at step 0 (stage default)
    etc_end: float | None = None  # ... and at the last step (cosine in between)
    action_weight_start: float = 1.0  # weight of the action loss against the ETC loss at step 0 ...
    action_weight_end: float = 1.0  # ... and at the last step (cosine in between)
    expert_warmup: int | None = None  # first steps in which the action loss does not reach the VLM
    levels: tuple[str, ...] = data.LEVELS  # ETC levels used (the paper's category ablation)
    chunk: int = 8  # actions per chunk
    freeze_vision: bool = False  # freeze the vision tower
    insulate: bool = False  # knowledge insulation for the whole run
    holdout: int = 10  # every holdout-th episode's ETC is kept for evaluation only
    log_every: int = 50
    eval_every: int = 1000  # held-out ETC accuracy every so often (and at the end)
    save_every: int = 1000
    eval_episodes: int = 20  # closed-loop episodes per task at the end; 0 skips
    ood_color: str = "yellow"  # stage 3 also evaluates this novel object colour + held-out paraphrases
    seed: int = 0
    resume: bool = False  # continue a run from out/train_state.pt
    overwrite: bool = False  # replace an existing --out
    device: str = "auto"  # auto | cpu | cuda


def resolve(cfg: Config) -> Config:
    """Fill what the command line left unset from the stage's defaults."""
    for k, v in STAGES[cfg.stage].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    return cfg


def lr_at(cfg: Config, step: int) -> float:
    """Linear warm-up, then cosine from lr down to lr * min_lr_ratio."""
    ramp = min(1.0, (step + 1) / max(cfg.warmup, 1))
    return cfg.lr * ramp * data.Schedule("cosine", 1.0, cfg.min_lr_ratio, cfg.steps)(step)


def build(cfg: Config, ds: data.Dataset) -> model.VLA:
    """The starting model: the base VLM, a stage-1 VLM with a fresh head, or a stage-2 VLA."""
    torch.manual_seed(cfg.seed)  # a fresh expert starts the same way in every process
    options = dict(head=cfg.head, chunk=cfg.chunk, freeze_vision=cfg.freeze_vision, insulate=cfg.insulate)
    stats = ds.meta["stats"]
    if cfg.init == "base":
        return model.VLA(model.VLAConfig(vlm=cfg.vlm, image_size=ds.meta["image_size"], **options), stats=stats)
    if not (Path(cfg.init) / "config.json").is_file():
        prev = "python train_etc.py" if cfg.stage == 2 else "python train_vla.py --stage 2"
        raise model.CheckpointError(f"no checkpoint at {cfg.init}: run stage {cfg.stage - 1} first "
                                    f"(`{prev}`), or pass --init base to fine-tune the base VLM directly")
    init = model.load(cfg.init)
    if init.cfg.image_size != ds.meta["image_size"]:
        raise model.CheckpointError(f"{cfg.init} was trained on {init.cfg.image_size} px images, {cfg.action_data} has "
                                    f"{ds.meta['image_size']} px; collect with --image-size {init.cfg.image_size}")
    if cfg.stage == 3:  # the whole policy carries on; its head must be the one asked for
        if init.cfg.head != cfg.head or init.cfg.chunk != cfg.chunk:
            raise model.CheckpointError(f"{cfg.init} has head={init.cfg.head}, chunk={init.cfg.chunk}; "
                                        f"pass --head {init.cfg.head} --chunk {init.cfg.chunk}")
        init.cfg.freeze_vision, init.cfg.insulate = cfg.freeze_vision, cfg.insulate
        if cfg.freeze_vision:
            init.vlm.model.vision_model.requires_grad_(False)
        return init.train()
    # stage 2 from stage 1: keep the bridged VLM, start a fresh action head on it
    vla = model.VLA(model.VLAConfig(**{**asdict(init.cfg), **options}), init.tokenizer, stats)
    vla.vlm.load_state_dict(init.vlm.state_dict())
    return vla


def closed_loop(vla: model.VLA, tasks: list[str], episodes: int, variation: sim.Variation,
                split: str = "train") -> dict:
    """Success per task on fresh layouts (seeds never used for collection)."""
    vla.eval()
    out = {}
    for task in tasks:
        text = sim.instructions(task, variation.color_word(), split)[0]
        policy = lambda im, ins, p: vla.act(torch.from_numpy(im[None].copy()), [ins], p[None])[0]  # noqa: E731
        seeds = [data.episode_seed(10_000 + k, task, 0) for k in range(episodes)]
        out[task] = float(np.mean(sim.run_policy(policy, task, seeds, text, variation, vla.cfg.image_size)))
    vla.train()
    return out


def main(cfg: Config):
    cfg = resolve(cfg)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    out = Path(cfg.out)
    if out.exists() and not (cfg.resume or cfg.overwrite):
        raise data.DataError(f"{out} exists; pass --resume to continue it, --overwrite to replace it, or another --out")
    if cfg.batch % world:
        raise data.DataError(f"--batch {cfg.batch} must be divisible by the {world} processes")
    ds = data.Dataset(cfg.action_data)
    if cfg.resume:
        vla = model.load(out, expect=dict(head=cfg.head, chunk=cfg.chunk)).train()
        state = torch.load(out / "train_state.pt", weights_only=False)
    else:
        vla, state = build(cfg, ds), None
    vla.to(device)
    etc_sets, probe = [], []
    for path in cfg.etc_data:
        eds = data.Dataset(path, image_size=vla.cfg.image_size)
        recs = [r for r in data.read_etc(eds.path / "etc.jsonl") if r["level"] in cfg.levels]
        etc_sets.append((eds, [r for r in recs if not data.held_out(r, cfg.holdout)]))
        probe += [(eds, r) for r in recs if data.held_out(r, cfg.holdout)][::7][:300]  # as in stage 1
    weights = {lv: 1.0 for lv in cfg.levels}
    batches = data.Batches(etc_sets, data.ActionSamples(ds, cfg.chunk, stats=vla.stats), vla.tokenizer, vla.image_ids, cfg.batch,
                           data.Schedule("cosine", cfg.etc_start, cfg.etc_end, cfg.steps), weights, cfg.seed)
    params = [p for p in vla.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    start = 0
    if state:
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    net = torch.nn.parallel.DistributedDataParallel(vla, find_unused_parameters=True) if world > 1 else vla
    action_weight = data.Schedule("cosine", cfg.action_weight_start, cfg.action_weight_end, cfg.steps)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.with_name(out.name + ".log.jsonl"), "a" if cfg.resume else "w", buffering=1) if rank == 0 else None  # line-buffered: a crash keeps the log

    def save(step: int):
        if rank == 0:
            vla.save(out, dict(optimizer=opt.state_dict(), step=step, config=asdict(cfg)))

    done, t0, seen = start, time.perf_counter(), []
    try:
        for step in range(start, cfg.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            etc, act = batches(step, rank, world)
            seen.append(batches.etc_fraction)
            vla.warming_up = step < cfg.expert_warmup  # the fresh expert's random gradients stay out of the VLM
            with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
                terms = net(etc=to(etc, device), act=to(act, device))
            loss, logs = model.global_loss(terms, {"lm": 1.0, vla.cfg.head: action_weight(step)}, world)
            if not math.isfinite(float(sum(logs.values()))):
                raise FloatingPointError(f"the loss is {logs} at step {step}; lower --lr (now {cfg.lr}). "
                                         f"The last checkpoint in {out} is kept.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            done = step + 1  # steps whose update is in the weights
            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps - 1):
                dt = (time.perf_counter() - t0) / (step - start + 1)
                row = dict(step=step, **logs, lr=lr_at(cfg, step), ms=1000 * dt,
                           samples_s=cfg.batch / dt, etc_frac=float(np.mean(seen[-cfg.log_every:])))
                print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
                log.write(json.dumps(row) + "\n")
            if step + 1 < cfg.steps and (step + 1) % cfg.save_every == 0:
                save(step + 1)
            if rank == 0 and probe and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                log.write(json.dumps(dict(step=step + 1, etc=vla.etc_scores(probe))) + "\n")
    except KeyboardInterrupt:  # Ctrl-C: keep what was learned, resumable with --resume
        save(done)
        print(f"interrupted: saved {done} steps to {out}; continue with --resume", file=sys.stderr)
        raise SystemExit(130)
    save(cfg.steps)
    if rank == 0:
        summary = dict(stage=cfg.stage, steps=cfg.steps, etc=vla.etc_scores(probe) if probe else {})
        if cfg.eval_episodes:
            var = sim.Variation(**ds.meta["variation"])
            summary["success"] = closed_loop(vla, ds.tasks, cfg.eval_episodes, var)
            if cfg.stage == 3 and cfg.ood_color:
                ood = sim.Variation(**{**ds.meta["variation"], "object_color": cfg.ood_color})
                summary["success_ood"] = closed_loop(vla, ds.tasks, cfg.eval_episodes, ood, "heldout")
        print(json.dumps(summary))
        log.write(json.dumps(summary) + "\n")
        log.close()
    if world > 1:
        dist.destroy_process_group()


def to(batch: dict | None, device) -> dict | None:
    return None if batch is None else {k: v.to(device) for k, v in batch.items()}


if __name__ == "__main__":
    try:
        main(tyro.cli(Config))
    except (ValueError, FloatingPointError) as err:  # bad input, checkpoint or a diverged run
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
