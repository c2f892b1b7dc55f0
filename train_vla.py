"""Stages 2 and 3 of ETC bridging, Objective Bridging and Retentive Adaptation, and the baselines.

    python train_vla.py --stage 2          # from out/stage1: actions co-trained with ETC
    python train_vla.py --stage 3          # from out/stage2: few target demos + target/OOD ETC
    torchrun --nproc_per_node=2 train_vla.py --stage 2     # the same, with PyTorch DDP

Baselines are flags: --init base (no stage 1), --etc-start 0 --etc-end 0 (action only), --levels
scene, --head tokens, --freeze-vision, --insulate. Losses are global sums over global counts, so
N processes give the same loss and gradients as one.
"""
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np, torch

import data, etc, model, scaffold, sim

# Stage defaults; any of them can be overridden on the command line.
STAGES = {
    2: dict(action_data="data/source", etc_data=("data/source", "data/scenes"), init="out/stage1", out="out/stage2",
            steps=3000, lr=5e-4, etc_start=0.5, etc_end=0.2, expert_warmup=200,
            kind_weights={"marker": 20.0, "goal": 20.0}),  # what the goal step writes, kept sharp (docs/notes.md)
    3: dict(action_data="data/target", etc_data=("data/target", "data/ood"), init="out/stage2", out="out/stage3",
            steps=800, lr=1e-4, etc_start=0.3, etc_end=0.3, expert_warmup=0, kind_weights={}),
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
    vision_lr: float = 1.0  # the vision tower's learning rate as a fraction of --lr
    warmup: int = 100  # linear learning-rate warm-up steps, then cosine to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0  # gradient-norm clipping
    etc_start: float | None = None  # ETC fraction of the batch at step 0 (stage default)
    etc_end: float | None = None  # ... and at the last step (cosine in between)
    action_weight_start: float = 1.0  # weight of the action loss against the ETC loss at step 0 ...
    action_weight_end: float = 1.0  # ... and at the last step (cosine in between)
    expert_warmup: int | None = None  # first steps in which the action loss does not reach the VLM
    levels: tuple[str, ...] = etc.LEVELS  # ETC levels used (the paper's category ablation)
    kind_weights: dict[str, float] | None = None  # e.g. --kind-weights marker 8: that kind's records 8x as likely in its level (stage default)
    chunk: int = 8  # actions per chunk
    freeze_vision: bool = False  # freeze the vision tower
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # bf16 autocast; auto: on CUDA only
    grad_checkpoint: bool = False  # recompute activations in backward (vision tower, expert): memory for time
    fsdp: bool = False  # under torchrun: FSDP2 shards the model across processes (DDP copies it); for a VLM too big for one GPU
    insulate: bool = False  # knowledge insulation for the whole run
    # Stage 2, flow head: the VLM writes the goal's pixel (push: the puck's first) and the expert reads it (pi0.5's
    # high-level step): 0.83 toward the named marker, 0.35 without (docs/notes.md). --no-goal-step: the expert reads
    # the instruction alone. Stage 3 keeps its checkpoint's; the token head writes its actions as text and has none.
    goal_step: bool = True
    holdout: int = 10  # every holdout-th episode's ETC is kept for evaluation only
    log_every: int = 50  # 0 = only the last step
    eval_every: int = 1000  # held-out ETC accuracy every so often (and at the end); 0 = only at the end
    save_every: int = 1000  # 0 = only at the end (and on Ctrl-C)
    eval_episodes: int = 20  # closed-loop episodes per task at the end; 0 skips
    ood_goal_colors: tuple[str, ...] = ("teal=0,0.5,0.5", "lime=0.6,1,0.2")  # stage 3 with markers: goals named by novel words
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

def build(cfg: Config, ds: data.Dataset) -> model.VLA:
    """The starting model: the base VLM, a stage-1 VLM with a fresh head, or a stage-2 VLA."""
    torch.manual_seed(cfg.seed)  # a fresh expert starts the same way in every process
    options = dict(head=cfg.head, chunk=cfg.chunk, freeze_vision=cfg.freeze_vision, insulate=cfg.insulate,
                   goal_step=cfg.goal_step and cfg.head == "flow", grad_checkpoint=cfg.grad_checkpoint)
    stats = ds.meta["stats"]
    if cfg.init == "base":
        return model.VLA(model.VLAConfig(vlm=cfg.vlm, image_size=ds.meta["image_size"], **options), stats=stats,
                         corpus=etc.corpus())
    if not (Path(cfg.init) / "config.json").is_file():
        prev = "python train_etc.py" if cfg.stage == 2 else "python train_vla.py --stage 2"
        raise model.CheckpointError(f"no checkpoint at {cfg.init}: run stage {cfg.stage - 1} first "
                                    f"(`{prev}`), or pass --init base to fine-tune the base VLM directly")
    if cfg.stage == 3:  # the whole policy carries on: its action head must have been trained
        scaffold.require_trained_head(cfg.init, "stage 3 continues a trained policy: pass a stage-2 checkpoint as --init")
    init = model.load(cfg.init, **{k: options[k] for k in ("freeze_vision", "insulate", "grad_checkpoint")})
    if init.cfg.image_size != ds.meta["image_size"]:
        raise model.CheckpointError(f"{cfg.init} was trained on {init.cfg.image_size} px images, {cfg.action_data} has "
                                    f"{ds.meta['image_size']} px; collect with --image-size {init.cfg.image_size}")
    if cfg.stage == 3 and (init.cfg.head != cfg.head or init.cfg.chunk != cfg.chunk):
        raise model.CheckpointError(f"{cfg.init} has head={init.cfg.head}, chunk={init.cfg.chunk}; "
                                    f"pass --head {init.cfg.head} --chunk {init.cfg.chunk}")
    if cfg.stage == 3:
        return init.train()
    # stage 2 from stage 1: keep the bridged VLM, start a fresh action head on it
    vla = model.VLA(model.VLAConfig(**{**asdict(init.cfg), **options}), init.tokenizer, stats, init.vlm.config.to_dict())
    vla.vlm.load_state_dict(init.vlm.state_dict())
    return vla

def main(cfg: Config):
    cfg = resolve(cfg)
    etc.check_kinds(cfg.kind_weights, "--kind-weights")
    proc, out = scaffold.start(cfg.device), Path(cfg.out)
    scaffold.check_out(out, cfg.resume, cfg.overwrite, cfg.steps, cfg.batch, proc.world_size)
    ds = data.Dataset(cfg.action_data)
    vla = model.load(out, expect=dict(head=cfg.head, chunk=cfg.chunk), grad_checkpoint=cfg.grad_checkpoint).train() if cfg.resume else build(cfg, ds)
    vla.to(proc.device)
    net = scaffold.wrap(vla, proc, cfg.fsdp)
    train, held = etc.load(cfg.etc_data, cfg.levels, cfg.holdout, vla.cfg.image_size)
    probe = [item for h in held for item in h[::7][:300]]  # as in stage 1
    actions = data.ActionSamples(ds, cfg.chunk, stats=vla.stats)
    batches = data.Batches(etc.Samples(train), etc.GoalSteps(actions) if vla.cfg.goal_step else actions, vla.tokenizer,
                           vla.image_ids, cfg.batch, data.Ramp("cosine", cfg.etc_start, cfg.etc_end, cfg.steps),
                           dict.fromkeys(cfg.levels, 1.0), cfg.seed, cfg.kind_weights)
    opt = scaffold.adamw(scaffold.param_groups(vla, cfg.vision_lr), proc, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    start = scaffold.load_state(out, net, optimizer=opt) if cfg.resume else 0
    action_weight = data.Ramp("cosine", cfg.action_weight_start, cfg.action_weight_end, cfg.steps)
    log = scaffold.open_log(out, cfg.resume, proc)
    parent = None if cfg.init == "base" else cfg.init
    before = (scaffold.action_steps(parent) or 0) if cfg.stage == 3 and parent else 0  # stage 2: a fresh head
    prov = scaffold.provenance("train_vla.py", cfg, parent, before + cfg.steps, stage=cfg.stage,
                               datasets=dict(actions=cfg.action_data, etc=list(cfg.etc_data)),
                               etc_mix=dict(levels=list(cfg.levels), kind_weights=cfg.kind_weights, start=cfg.etc_start, end=cfg.etc_end))

    save = partial(scaffold.save, vla, out, cfg, prov, proc, optimizer=opt)  # save(step)

    done, t0, seen = start, time.perf_counter(), []
    try:
        for step in range(start, cfg.steps):
            lr = scaffold.lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
            scaffold.set_lr(opt, lr)
            etc_batch, act_batch, etc_fraction = batches(step, proc.rank, proc.world_size)
            seen.append(etc_fraction)
            with scaffold.autocast(proc, cfg.dtype):  # insulate: a fresh expert's random gradients stay out of the VLM
                terms = net(etc=scaffold.to(etc_batch, proc.device), act=scaffold.to(act_batch, proc.device),
                            insulate=step < cfg.expert_warmup)
            loss, logs = model.global_loss(terms, {"lm": 1.0, vla.cfg.head: action_weight(step)}, proc.world_size)
            scaffold.check_finite(logs, step, cfg.lr, out)
            scaffold.update(opt, loss, cfg.clip)
            done = step + 1  # steps whose update is in the weights
            if proc.rank == 0 and (scaffold.due(step, cfg.log_every) or done == cfg.steps):
                dt = (time.perf_counter() - t0) / (done - start)
                scaffold.log(log, dict(step=step, **logs, lr=lr, ms=1000 * dt, samples_s=cfg.batch / dt,
                                       etc_frac=float(np.mean(seen[-max(cfg.log_every, 1):]))))
            if done < cfg.steps and scaffold.due(done, cfg.save_every):
                save(done)
            scaffold.probe(log, vla, net, probe, proc, done, cfg.steps, cfg.eval_every)
    except KeyboardInterrupt:
        scaffold.interrupted(save, done, out)
    save(cfg.steps)
    if proc.rank == 0:
        vla = scaffold.whole(vla, net, out, proc)
        summary = dict(stage=cfg.stage, steps=cfg.steps, etc=scaffold.etc_accuracy(vla, probe) if probe else {})
        if cfg.eval_episodes:
            var = sim.Variation(**ds.meta["variation"])
            summary["success"] = scaffold.closed_loop(vla, ds.tasks, cfg.eval_episodes, var)
            if cfg.stage == 3 and var.markers and cfg.ood_goal_colors:  # the novel words, held-out phrasings
                ood = sim.Variation(**{**ds.meta["variation"], "goal_colors": cfg.ood_goal_colors})
                summary["success_ood"] = scaffold.closed_loop(vla, list(sim.MARKER_TEXT), cfg.eval_episodes, ood, "heldout")
        scaffold.close_log(log, summary)
    scaffold.finish(proc)

if __name__ == "__main__":
    data.cli(main, Config)
