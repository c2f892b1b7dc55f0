"""What the training loops share: processes, lr, the update, logs, checkpoints, resume, evaluation.

The scripts keep their own explicit `for step in range(...)` loops and call these plain functions
(no Trainer, no callbacks). A run resumes exactly because every batch, and every random draw in it,
is a function of (seed, step): train_state.pt holds only the step and the optimizer states.
"""
import json, math, os, re, subprocess, sys
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np, torch, torch.distributed as dist

import data, etc, model, sim

ROOT = Path(__file__).resolve().parent

# --- Processes --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Process:  # this process among world_size (rank 0 alone, without torchrun)
    rank: int
    world_size: int
    device: torch.device
    cuda: bool

def start(device: str = "auto") -> Process:
    """This process under torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or alone; DDP's process group
    with nccl on GPUs, gloo on CPUs. device: auto | cpu | cuda."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world_size > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    return Process(rank, world_size, dev, cuda)

def autocast(proc: Process, dtype: str):
    """Mixed precision: matmuls in bfloat16 under torch.autocast, while the weights, the AdamW
    states and the loss reductions stay fp32 (so no fp32 master copy is needed). dtype: auto
    (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16."""
    return torch.autocast(proc.device.type, torch.bfloat16, enabled=bf16(proc, dtype))

def bf16(proc: Process, dtype: str) -> bool:
    return dtype == "bfloat16" or (dtype == "auto" and proc.cuda)

def finish(proc: Process):
    if proc.world_size > 1:
        dist.destroy_process_group()

def wrap(vla: model.VLA, proc: Process, fsdp: bool) -> torch.nn.Module:
    """The network the loop calls; build the optimizer after this. One process: the VLA. Several:
    DDP (a whole copy in each), or with fsdp FSDP2's fully_shard: each transformer layer of the
    VLM (HF's GradientCheckpointingLayer: vision and text), then the rest, keeps 1/world_size of
    its parameters, gradients and AdamW states and all-gathers a layer's weights as it runs."""
    if proc.world_size == 1:
        return vla
    if not fsdp:
        return torch.nn.parallel.DistributedDataParallel(vla, find_unused_parameters=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers.modeling_layers import GradientCheckpointingLayer
    mesh = init_device_mesh(proc.device.type, (proc.world_size,))
    for layer in [m for m in vla.modules() if isinstance(m, GradientCheckpointingLayer)]:
        fully_shard(layer, mesh=mesh)
    return fully_shard(vla, mesh=mesh)

def sharded(net: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(net, FSDPModule)

def whole(vla: model.VLA, net: torch.nn.Module, out: Path, proc: Process) -> model.VLA:
    """The model to evaluate on rank 0 after training: the VLA, or, sharded, its saved checkpoint."""
    return model.load(out).to(proc.device) if sharded(net) else vla

def to(batch: dict | None, device) -> dict | None:
    return None if batch is None else {k: v.to(device) for k, v in batch.items()}

# --- The run's folder: checkpoints, exact resume, Ctrl-C, provenance --------------------------
def check_out(out: Path, resume: bool, overwrite: bool, steps: int, batch: int, world_size: int = 1):
    """Stop before any work when --out, --resume, --steps or --batch cannot be honoured."""
    data.check_positive(steps=steps, batch=batch)
    if resume and not (out / "train_state.pt").is_file():
        raise model.CheckpointError(f"nothing to resume at {out} (no train_state.pt); drop --resume to start a new run")
    if out.exists() and not (resume or overwrite):
        raise data.DataError(f"{out} exists; pass --resume to continue it, --overwrite to replace it, or another --out")
    if batch % world_size:
        raise data.DataError(f"--batch {batch} must be divisible by the {world_size} processes")

def save(vla: model.VLA, out: Path, cfg, provenance: dict, proc: Process, step: int, **states):
    """The checkpoint folder (rank 0 writes it), with train_state.pt: the step, the config and
    the state_dict() of each object in `states` (optimizers, extra networks). Sharded (FSDP2),
    every process joins in gathering the whole weights and optimizer states onto rank 0's CPU."""
    weights, fsdp = None, sharded(vla)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(vla, options=opts)
        states = {k: get_optimizer_state_dict(vla, v, options=opts) for k, v in states.items()}  # only optimizers here
    else:
        states = {k: v.state_dict() for k, v in states.items()}
    if proc.rank == 0:
        vla.save(out, dict(step=step, config=asdict(cfg), fsdp=fsdp, **states), dict(provenance, steps_done=step), weights)

def load_state(out: Path, net: torch.nn.Module | None = None, **states) -> int:
    """Restore each object in `states` from out/train_state.pt (optimizers of a sharded `net`
    through torch's distributed state-dict API); the step to continue from."""
    try:
        state = torch.load(out / "train_state.pt", weights_only=False)
        fsdp = net is not None and sharded(net)
        if state.get("fsdp", False) != fsdp:
            raise ValueError(f"it was trained {'with' if state.get('fsdp') else 'without'} --fsdp; resume it the same way")
        for k, obj in states.items():
            if fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
                set_optimizer_state_dict(net, obj, state[k], options=StateDictOptions(full_state_dict=True))
            else:
                obj.load_state_dict(state[k])
    except (OSError, RuntimeError, KeyError, ValueError) as err:
        raise model.CheckpointError(f"{out}/train_state.pt cannot be resumed from ({err}); start again with --overwrite") from None
    return state["step"]

def interrupted(save_at, done: int, out: Path):
    """Ctrl-C: save the `done` steps whose update is in the weights, exit 130 (as a shell does)."""
    save_at(done)
    print(f"interrupted: saved {done} steps to {out}; continue with --resume", file=sys.stderr)
    raise SystemExit(130)

def commit() -> str | None:
    """The code's git commit ('+dirty' with uncommitted changes to tracked files), if known."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "") if head.returncode == 0 else None

def provenance(script: str, cfg, parent: str | None, action_steps: int, **fields) -> dict:
    """What produced a checkpoint, for config.json: the script and its whole config, the parent
    checkpoint, the code commit, and action_steps: the optimiser steps its action head has been
    trained for, over the whole chain of parents (0: never; evaluation refuses such a policy)."""
    return dict(script=script, **fields, parent=parent, action_steps=action_steps, seed=cfg.seed,
                code=commit(), config=asdict(cfg))

def action_steps(ckpt: str | Path) -> int | None:  # None: not recorded (e.g. saved by hand)
    return model.read_config(ckpt)["provenance"].get("action_steps")

def require_trained_head(ckpt: str | Path, fix: str):
    p = model.read_config(ckpt)["provenance"]
    if p.get("action_steps") == 0:
        raise model.CheckpointError(f"{ckpt}'s action expert was never trained (it was written by {p.get('script')}, "
                                    f"stage {p.get('stage')}); {fix}")

# --- The learning rate and the log ------------------------------------------------------------
def lr_at(step: int, peak: float, warmup: int, steps: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then cosine from peak to peak * min_ratio at `steps`:
    lr = peak * min(1, (step + 1) / warmup) * (1 - (1 - min_ratio) (1 - cos(pi step / steps)) / 2)."""
    x = min(max(step / max(steps, 1), 0.0), 1.0)
    return peak * min(1.0, (step + 1) / max(warmup, 1)) * (1.0 + (min_ratio - 1.0) * (0.5 * (1 - math.cos(math.pi * x))))

def set_lr(opt: torch.optim.Optimizer, lr: float):
    """Every parameter group at lr times its own lr_scale (1 unless param_groups set it)."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)

def param_groups(vla: model.VLA, vision_lr: float, skip: str | None = None) -> list[dict]:
    """AdamW's groups: the vision tower at vision_lr x the learning rate, the rest at 1x; frozen
    parameters and those whose name starts with `skip` left out. Why a slower tower: trained from
    scratch at the language model's rate, its features keep moving under the layers that read them,
    and the binding benchmark's single disc was not located in 750 steps, where at 0.1x it was."""
    named = [(n, p) for n, p in vla.named_parameters() if p.requires_grad and not (skip and n.startswith(skip))]
    vision = [p for n, p in named if ".vision_model." in n]
    return [dict(params=vision, lr_scale=vision_lr), dict(params=[p for n, p in named if ".vision_model." not in n], lr_scale=1.0)]

def adamw(params, proc: Process, **hyper) -> torch.optim.AdamW:
    """AdamW, as one fused kernel per step on CUDA (the default launches several per parameter group:
    at real size the update is a visible share of a step); on a CPU the default (the same update)."""
    return torch.optim.AdamW(params, fused=proc.cuda or None, **hyper)

def check_finite(logs: dict, step: int, lr: float, out: Path):
    """A diverged run stops before its update reaches the weights; the last checkpoint stays."""
    if not math.isfinite(float(sum(logs.values()))):
        raise FloatingPointError(f"the loss is {logs} at step {step}; lower --lr (now {lr}). The last checkpoint in {out} is kept.")

def update(opt: torch.optim.Optimizer, loss: torch.Tensor, clip: float):
    """One optimiser step on `loss`, the gradient norm of the optimiser's parameters clipped at `clip`."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
    opt.step()

def due(n: int, every: int) -> bool:
    """'Once in a while': n is a multiple of `every`; every = 0 means never."""
    return every > 0 and n % every == 0

def open_log(out: Path, resume: bool, proc: Process):
    """out.log.jsonl beside the checkpoint folder (rank 0), line-buffered so a crash keeps it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return open(out.with_name(out.name + ".log.jsonl"), "a" if resume else "w", buffering=1) if proc.rank == 0 else None

def close_log(f, summary: dict):
    """The run's last line: printed as JSON (for scripts that read it) and logged; closes the log."""
    print(json.dumps(summary))
    log(f, summary, echo=False)
    f.close()

def log(f, row: dict, echo: bool = True):
    """One JSON line in the log; the same as `step 50 lm 0.31 lr 0.001 ...` on the terminal."""
    if echo:
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    if f is not None:
        f.write(json.dumps(row) + "\n")

# --- Evaluation: closed loop in the simulator, and ETC questions ------------------------------
def policy(vla: model.VLA, steps: int | None = None):
    """run_policy's policy for a VLA: (image, instruction, raw proprio) -> raw actions (H, 4)
    in [-1, 1], through the normalisation stats the policy was trained with. Given a list of K
    texts (and noise (N, H, 4)): (K, N, H, 4), every text sampled from the same N noises (N = 1)."""
    p, a = ({k: np.array(v) for k, v in vla.stats[n].items()} for n in ("proprio", "actions"))

    def act(image: np.ndarray, instruction: str | list[str], proprio: np.ndarray, noise: torch.Tensor | None = None) -> np.ndarray:
        texts, n = [instruction] if isinstance(instruction, str) else instruction, 1 if noise is None else len(noise)
        s = [dict(image=image, text=t + "\n", proprio=((proprio - p["mean"]) / p["std"]).astype(np.float32)) for t in texts]
        if vla.cfg.goal_step:  # the VLM writes the goal's pixel first (greedy), then the expert reads it
            said = answers(vla, [dict(image=image, text=etc.prompt(etc.goal_question(t))) for t in texts], max_new=etc.GOAL_TOKENS)
            s = [etc.ask_goal(x, answer) for x, answer in zip(s, said)]
        s = [x for x in s for _ in range(n)]
        z = None if noise is None else noise.repeat(len(texts), 1, 1)
        chunks = vla.sample(to(data.collate(s, vla.tokenizer, vla.image_ids), vla.device), steps, z)
        chunks = np.clip(chunks.float().cpu().numpy() * a["std"] + a["mean"], -1, 1)
        return chunks[0] if isinstance(instruction, str) and noise is None else chunks.reshape(len(texts), n, *chunks.shape[1:])
    return act

def run_policy(policy, task: str, seeds: list[int], instruction, variation: sim.Variation = sim.Variation(),
               image_size: int = 64, max_steps: int = 200, execute: int = 8, frames: list | None = None) -> list[tuple]:
    """Closed-loop episodes, one per layout seed: (success at any step, whether the episode ended
    nearest the named marker, whether between two alike goals; None where it does not apply).
    policy(image (H, W, 3) uint8, text, proprio (4,)) -> actions (K, 4) in [-1, 1], the first
    `execute` run before asking again. instruction: a text, or World -> (text, named marker);
    frames: a list gets each episode's images. The torch noise a policy draws in an episode is
    seeded by its layout seed (the caller's generator left as it was): an episode's outcome does
    not depend on which worker ran it or after what, and every checkpoint sees the same draws."""
    world, results = sim.World(task, image_size, variation), []
    try:
        for seed in seeds:
            world.seed(seed)
            text, named = instruction(world) if callable(instruction) else (instruction, world.goal_marker)
            success, seen = False, []
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                while world.steps < max_steps and not success:
                    chunk = policy(world.render(), text, world.proprio())
                    for a in chunk[:execute]:
                        success = world.step(a) or success
                        if frames is not None:
                            seen.append(world.render())
                        if success or world.steps >= max_steps:
                            break
            results.append((success, world.nearest_marker() == named if len(world.markers) else None, world.between()))
            if frames is not None:
                frames.append(seen)
    finally:
        world.close()
    return results

def grounding_probe(chunks, task: str, seeds: list[int], variation: sim.Variation, image_size: int = 64,
                    chunk: int = 8, split: str = "train", ask=None) -> list[dict]:
    """Does a policy read the colour word? No rollouts: in each layout name each marker in turn and
    ask which marker's expert chunk the policy's first chunk is nearest to (xyz of every action;
    chance 1/K). chunks(image, texts (K,), proprio) -> (K, N, H, 4): N draws per text, the same N
    noises for every text, so only the word differs. One row per (layout, named marker); none for a
    layout whose expert chunks do not tell the markers apart. ask(samples) -> answers, if given, is
    the VLM asked the ETC goal question on the same image: a row's `vlm` is the marker nearest its
    answer (-1 for no point), which tells a VLM that cannot bind the word from an expert that does
    not read what the VLM knows."""
    world, rows = sim.World(task, image_size, replace(variation, ambiguous=0.0)), []
    try:
        for seed in seeds:
            texts, experts = [], []
            for j in range(variation.markers):
                world.seed(seed, goal=j)  # the same markers, marker j named
                if j == 0:  # the start the policy sees: the same image and state whichever marker is named
                    image, proprio = world.render(), world.proprio()
                texts.append(world.instruction("right", split)[0])
                experts.append([])
                for _ in range(chunk):  # the scripted expert's first chunk toward marker j
                    experts[-1].append(world.expert_action())
                    world.step(experts[-1][-1])
            want = np.array(experts)[..., :3]  # (K, H, 3)
            if min(np.linalg.norm(want[i] - want[k]) for i in range(len(want)) for k in range(i)) < 1e-6:
                continue  # the expert's first chunk is the same toward every marker (push: it goes to the puck first)
            got = chunks(image, texts, proprio)[..., :3]  # (K, N, H, 3)
            gap = np.linalg.norm(got[:, :, None] - want[None, None], axis=(-2, -1))  # (K named, N, K experts)
            nearest = gap.argmin(-1)  # (K, N): the marker whose expert chunk each draw is closest to
            said = ask([dict(image=image, text=etc.prompt(etc.goal_question(t))) for t in texts]) if ask else ()
            markers_px = world.project(world.markers)  # (K, 2), the same for every named marker
            rows += [dict(seed=seed, word=w, hit=float(np.mean(nearest[j] == j)), nearest=nearest[j].tolist())
                     | (vlm_row(said[j], j, markers_px) if ask else {})
                     for j, w in enumerate(world.marker_words)]
    finally:
        world.close()
    return rows

def vlm_row(answer: str, named: int, markers_px: np.ndarray) -> dict:
    """The probe's VLM columns: the marker (of markers_px, (K, 2)) nearest a point answer "u v" (-1 if
    the answer is not one point) and whether it is the named one."""
    uv = [float(x) for x in re.findall(r"-?\d+", answer)]
    nearest = int(np.linalg.norm(markers_px - uv, axis=1).argmin()) if len(uv) == 2 else -1
    return dict(vlm=nearest, vlm_hit=float(nearest == named))

def closed_loop(vla: model.VLA, tasks: list[str], episodes: int, variation: sim.Variation, split: str = "train") -> dict:
    """Success per task on evaluation seed 0's fresh layouts (eval.py success's first seed)."""
    vla.eval()
    out = {}
    for task in tasks:
        seeds, instruction = data.eval_seeds(task, 0, episodes), partial(sim.World.instruction, split=split)
        out[task] = float(np.mean([ok for ok, _, _ in run_policy(policy(vla), task, seeds, instruction, variation, vla.cfg.image_size)]))
    vla.train()
    return out

def probe(f, vla: model.VLA, net: torch.nn.Module, items: list[tuple], proc: Process, done: int, steps: int, every: int):
    """Once in a while during training (the end is the summary's): held-out ETC accuracy into the
    log f, on rank 0. Sharded (FSDP2) weights are not whole on one rank: probed at the end only."""
    if proc.rank == 0 and items and done < steps and due(done, every) and not sharded(net):
        log(f, dict(step=done, etc=etc_accuracy(vla, items)), echo=False)

def etc_accuracy(vla: model.VLA, items: list[tuple], by: str = "level") -> dict:
    """Greedy answers to (dataset, record) ETC items, scored per level (or kind) by etc.scores."""
    return etc.scores([r for _, r in items], etc_answers(vla, items), by=by)

def etc_answers(vla: model.VLA, items: list[tuple]) -> list[str]:
    return answers(vla, [{k: v for k, v in etc.sample(ds, r).items() if k != "answer"} for ds, r in items])

@torch.no_grad()
def answers(vla: model.VLA, samples: list[dict], batch: int = 32, max_new: int = 32) -> list[str]:
    """The VLM's greedy answers to samples (image, text: an etc.prompt)."""
    was_training, preds = vla.training, []
    vla.eval()
    tok = vla.tokenizer
    for i in range(0, len(samples), batch):
        rows = model.greedy(vla.vlm, to(data.collate(samples[i:i + batch], tok, vla.image_ids), vla.device), max_new,
                            tok.eos_token_id, tok.pad_token_id).tolist()
        preds += [tok.decode(r[:r.index(tok.eos_token_id)] if tok.eos_token_id in r else r).strip() for r in rows]
    vla.train(was_training)
    return preds
