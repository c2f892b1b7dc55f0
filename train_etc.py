"""Stage 1 of ETC bridging, Distribution Bridging: the VLM learns the robot's scenes through
ETC question answering only (next-token loss on the answers), before it ever sees an action.

    python train_etc.py                              # data/source ETC -> out/stage1
    python train_etc.py --freeze-vision              # the paper's ablation (it hurt there)
    torchrun --nproc_per_node=2 train_etc.py         # PyTorch DDP

The whole model is trained, vision tower included, unless --freeze-vision. The action
expert exists in the checkpoint but is untouched here; stage 2 starts a fresh one.
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import tyro

import data
import model


@dataclass
class Config:
    etc_data: tuple[str, ...] = ("data/source",)  # datasets whose etc.jsonl to train on
    out: str = "out/stage1"  # output checkpoint folder
    vlm: str = "tiny"  # the base VLM: "tiny" or a path / hub id
    steps: int = 1500  # optimiser steps
    batch: int = 32  # global batch of ETC records
    lr: float = 1e-3  # peak learning rate
    warmup: int = 100  # linear warm-up steps, then cosine to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0  # gradient-norm clipping
    levels: tuple[str, ...] = data.LEVELS  # ETC levels used
    freeze_vision: bool = False  # freeze the vision tower (ablation)
    holdout: int = 10  # every holdout-th episode's ETC is kept for evaluation only
    log_every: int = 50
    eval_every: int = 500  # held-out ETC accuracy every so often (and at the end)
    save_every: int = 500
    seed: int = 0  # fixes the initial weights and every batch
    resume: bool = False  # continue a run from out/train_state.pt
    overwrite: bool = False  # replace an existing --out
    device: str = "auto"  # auto | cpu | cuda


def main(cfg: Config):
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
    sets = [data.Dataset(p) for p in cfg.etc_data]
    sizes = {ds.meta["image_size"] for ds in sets}
    if len(sizes) > 1:
        raise data.DataError(f"the ETC datasets mix image sizes {sorted(sizes)}; collect them at one --image-size")
    torch.manual_seed(cfg.seed)
    if cfg.resume:
        vla, state = model.load(out).train(), torch.load(out / "train_state.pt", weights_only=False)
    else:
        vla, state = model.VLA(model.VLAConfig(vlm=cfg.vlm, image_size=sizes.pop(), freeze_vision=cfg.freeze_vision),
                               stats=sets[0].meta["stats"]), None
    vla.to(device)
    etc_sets, probe = [], []
    for ds in sets:
        recs = [r for r in data.read_etc(ds.path / "etc.jsonl") if r["level"] in cfg.levels]
        etc_sets.append((ds, [r for r in recs if not data.held_out(r, cfg.holdout)]))
        probe += [(ds, r) for r in recs if data.held_out(r, cfg.holdout)][::7][:300]
    batches = data.Batches(etc_sets, None, vla.tokenizer, vla.image_ids, cfg.batch,
                           data.Schedule("constant", 1.0, 1.0), {lv: 1.0 for lv in cfg.levels}, cfg.seed)
    params = [p for n, p in vla.named_parameters() if p.requires_grad and not n.startswith("expert.")]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    start = 0
    if state:
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    net = torch.nn.parallel.DistributedDataParallel(vla, find_unused_parameters=True) if world > 1 else vla
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.with_name(out.name + ".log.jsonl"), "a" if cfg.resume else "w", buffering=1) if rank == 0 else None  # line-buffered: a crash keeps the log
    schedule = data.Schedule("cosine", 1.0, cfg.min_lr_ratio, cfg.steps)

    def save(step: int):
        if rank == 0:
            vla.save(out, dict(optimizer=opt.state_dict(), step=step, config=asdict(cfg)))

    done, t0 = start, time.perf_counter()
    try:
        for step in range(start, cfg.steps):
            lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1)) * schedule(step)  # warm-up, then cosine
            for g in opt.param_groups:
                g["lr"] = lr
            etc, _ = batches(step, rank, world)
            with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
                terms = net(etc={k: v.to(device) for k, v in etc.items()})
            loss, logs = model.global_loss(terms, {"lm": 1.0}, world)
            if not math.isfinite(logs["lm"]):
                raise FloatingPointError(f"the loss is {logs['lm']} at step {step}; lower --lr (now {cfg.lr}). "
                                         f"The last checkpoint in {out} is kept.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            done = step + 1  # steps whose update is in the weights
            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps - 1):
                dt = (time.perf_counter() - t0) / (step - start + 1)
                row = dict(step=step, lm=logs["lm"], lr=lr, ms=1000 * dt, samples_s=cfg.batch / dt)
                print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
                log.write(json.dumps(row) + "\n")
            if step + 1 < cfg.steps and (step + 1) % cfg.save_every == 0:
                save(step + 1)
            if rank == 0 and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                log.write(json.dumps(dict(step=step + 1, etc=vla.etc_scores(probe))) + "\n")
    except KeyboardInterrupt:  # Ctrl-C: keep what was learned, resumable with --resume
        save(done)
        print(f"interrupted: saved {done} steps to {out}; continue with --resume", file=sys.stderr)
        raise SystemExit(130)
    save(cfg.steps)
    if rank == 0:
        summary = dict(stage=1, steps=cfg.steps, etc=vla.etc_scores(probe))
        print(json.dumps(summary))
        log.write(json.dumps(summary) + "\n")
        log.close()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(tyro.cli(Config))
    except (ValueError, FloatingPointError) as err:  # bad input, checkpoint or a diverged run
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
