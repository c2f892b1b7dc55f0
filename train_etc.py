"""Stage 1 of ETC bridging, Distribution Bridging: ETC question answering only, no actions.

    python train_etc.py                              # data/source + data/scenes ETC -> out/stage1
    python train_etc.py --freeze-vision              # the paper's ablation (it hurt there)
    torchrun --nproc_per_node=2 train_etc.py         # PyTorch DDP

The whole VLM learns the robot's scenes (next-token loss on the answers), vision tower included
unless --freeze-vision; the action expert is saved untouched (stage 2 starts a fresh one). In the
grounded world it binds colour words to places first: for the first half of the steps the batch is
marker questions alone ("where is the blue marker?"), then every kind with the marker's weighted up.
"""
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch

import data, etc, model, scaffold

@dataclass
class Config:
    etc_data: tuple[str, ...] = ("data/source", "data/scenes")  # datasets whose etc.jsonl to train on
    out: str = "out/stage1"  # output checkpoint folder
    vlm: str = "tiny"  # the base VLM: "tiny", smolvlm-256m-lm (pretrained language), smolvlm-256m/-500m (random), or a folder
    steps: int = 3000  # optimiser steps
    batch: int = 32  # global batch of ETC records
    lr: float = 1e-3  # peak learning rate
    vision_lr: float = 1.0  # the vision tower's learning rate as a fraction of --lr (at 0.1 the tiny tower does not bind: docs/notes.md)
    warmup: int = 100  # linear warm-up steps, then cosine to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0  # gradient-norm clipping
    levels: tuple[str, ...] = etc.LEVELS  # ETC levels used
    kind_weights: dict[str, float] | None = None  # e.g. --kind-weights marker 8: that kind's records 8x as likely in its level (None: marker 8)
    # a curriculum: the first phase draws only these kinds, those the data has; marker questions first bind colour
    # words to places: 0.78 within 4 px, 0.44 in the weighted mixture throughout (docs/notes.md)
    first_kinds: tuple[str, ...] = ("marker",)
    first_fraction: float = 0.5  # the first phase's share of the steps (0: none)
    freeze_vision: bool = False  # freeze the vision tower (ablation)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # bf16 autocast; auto: on CUDA only
    grad_checkpoint: bool = False  # recompute activations in backward (vision tower, expert): memory for time
    fsdp: bool = False  # under torchrun: FSDP2 shards the model across processes (DDP copies it); for a VLM too big for one GPU
    holdout: int = 10  # every holdout-th episode's ETC is kept for evaluation only
    log_every: int = 50  # 0 = only the last step
    eval_every: int = 500  # held-out ETC accuracy every so often (and at the end); 0 = only at the end
    save_every: int = 500  # 0 = only at the end (and on Ctrl-C)
    seed: int = 0  # fixes the initial weights and every batch
    resume: bool = False  # continue a run from out/train_state.pt
    overwrite: bool = False  # replace an existing --out
    device: str = "auto"  # auto | cpu | cuda

def main(cfg: Config):
    proc, out = scaffold.start(cfg.device), Path(cfg.out)
    scaffold.check_out(out, cfg.resume, cfg.overwrite, cfg.steps, cfg.batch, proc.world_size)
    sizes = {data.Dataset(p).meta["image_size"] for p in cfg.etc_data}
    if len(sizes) > 1:
        raise data.DataError(f"the ETC datasets mix image sizes {sorted(sizes)}; collect them at one --image-size")
    kind_weights = {"marker": 8.0} if cfg.kind_weights is None else cfg.kind_weights
    etc.check_kinds(kind_weights, "--kind-weights")
    etc.check_kinds(cfg.first_kinds, "--first-kinds")
    if not 0 <= cfg.first_fraction < 1:
        raise data.DataError(f"--first-fraction {cfg.first_fraction}: a fraction of the steps, at least 0 and below 1")
    torch.manual_seed(cfg.seed)
    vla = model.load(out, grad_checkpoint=cfg.grad_checkpoint).train() if cfg.resume else model.VLA(
        model.VLAConfig(vlm=cfg.vlm, image_size=sizes.pop(), freeze_vision=cfg.freeze_vision, grad_checkpoint=cfg.grad_checkpoint),
        stats=data.Dataset(cfg.etc_data[0]).meta["stats"], corpus=etc.corpus())
    vla.to(proc.device)
    net = scaffold.wrap(vla, proc, cfg.fsdp)
    train, held = etc.load(cfg.etc_data, cfg.levels, cfg.holdout)
    probe = [item for h in held for item in h[::7][:300]]  # a fixed spread of held-out records
    samples, whole = etc.Samples(train), data.Ramp("constant", 1.0, 1.0)  # ETC only: the whole batch
    first_kinds = sorted(set(cfg.first_kinds) & set(samples.kinds))  # a world without markers has no marker questions
    first_steps = round(cfg.first_fraction * cfg.steps) if first_kinds else 0
    batches = data.Batches(samples, None, vla.tokenizer, vla.image_ids, cfg.batch, whole, dict.fromkeys(cfg.levels, 1.0), cfg.seed,
                           kind_weights)
    first = data.Batches(samples, None, vla.tokenizer, vla.image_ids, cfg.batch, whole,  # the first phase's kinds alone
                         {lv: 1.0 for lv, k in zip(samples.levels, samples.kinds) if k in first_kinds}, cfg.seed,
                         {k: float(k in first_kinds) for k in etc.KINDS}) if first_steps else None
    params = scaffold.param_groups(vla, cfg.vision_lr, skip="expert.")  # stage 1 trains no action expert
    opt = scaffold.adamw(params, proc, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    start = scaffold.load_state(out, net, optimizer=opt) if cfg.resume else 0
    log = scaffold.open_log(out, cfg.resume, proc)
    prov = scaffold.provenance("train_etc.py", cfg, None, 0, stage=1, datasets=dict(etc=list(cfg.etc_data)),
                               etc_mix=dict(levels=list(cfg.levels), kind_weights=kind_weights, fraction=1.0,
                                           first_kinds=first_kinds, first_steps=first_steps))

    save = partial(scaffold.save, vla, out, cfg, prov, proc, optimizer=opt)  # save(step)

    done, t0 = start, time.perf_counter()
    try:
        for step in range(start, cfg.steps):
            lr = scaffold.lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
            scaffold.set_lr(opt, lr)
            batch, _, _ = (first if step < first_steps else batches)(step, proc.rank, proc.world_size)
            with scaffold.autocast(proc, cfg.dtype):
                terms = net(etc=scaffold.to(batch, proc.device))
            loss, logs = model.global_loss(terms, {"lm": 1.0}, proc.world_size)
            scaffold.check_finite(logs, step, cfg.lr, out)
            scaffold.update(opt, loss, cfg.clip)
            done = step + 1  # steps whose update is in the weights
            if proc.rank == 0 and (scaffold.due(step, cfg.log_every) or done == cfg.steps):
                dt = (time.perf_counter() - t0) / (done - start)
                scaffold.log(log, dict(step=step, lm=logs["lm"], lr=lr, ms=1000 * dt, samples_s=cfg.batch / dt))
            if done < cfg.steps and scaffold.due(done, cfg.save_every):
                save(done)
            scaffold.probe(log, vla, net, probe, proc, done, cfg.steps, cfg.eval_every)
    except KeyboardInterrupt:
        scaffold.interrupted(save, done, out)
    save(cfg.steps)
    if proc.rank == 0:
        vla = scaffold.whole(vla, net, out, proc)
        scaffold.close_log(log, dict(stage=1, steps=cfg.steps, etc=scaffold.etc_accuracy(vla, probe)))
    scaffold.finish(proc)

if __name__ == "__main__":
    data.cli(main, Config)
