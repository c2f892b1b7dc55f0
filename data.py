"""Demonstrations on disk, loading, normalisation, action samples, the ETC/action mixer, collation.

    python data.py collect --tasks reach push --episodes 30 --out data/source

On disk: data/<name>/meta.json and data/<name>/<task>/<array>.npy, one row per frame, loaded
memory-mapped; --no-actions (novel scenes for OOD ETC) stores no action labels. etc.py builds on
this file, never the reverse: the mixer takes any source with `levels`, len() and source(j).
"""
import json, math, multiprocessing as mp, shutil, sys, tempfile, warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np, torch, tyro
from tqdm import tqdm

import sim

FORMAT_VERSION = 2  # 2: the coloured markers
ARRAYS = ("images", "proprio", "episode", "step", "hand", "objects", "goal", "hand_px", "objects_px", "goal_px", "objects_box",
          "hand_box", "success", "contact", "grip", "camera", "markers", "markers_px", "marker_color", "goal_marker")

class DataError(ValueError):
    """Bad input the user can fix; the CLIs print it as one line and exit non-zero."""

def check_positive(**counts: int):
    """Stop before any work on a count that leaves nothing to do (--episodes 0, --batch 0, --steps -1)."""
    for name, n in counts.items():
        if n < 1:
            raise DataError(f"--{name.replace('_', '-')} {n}: use 1 or more")

# --- Collection -------------------------------------------------------------------------------
@dataclass
class Collect:
    tasks: tuple[str, ...] = ("reach", "push", "drawer-open", "button-press-topdown")  # task names
    episodes: int = 30  # successful demonstrations per task (per named marker, with --goals-per-layout)
    goals_per_layout: int = 1  # tasks with markers: each layout demonstrated toward this many of its markers, each named in turn
    out: str = "data/source"  # dataset folder
    image_size: int = 64  # rendered square images, in pixels
    variation: sim.Variation = field(default_factory=sim.Variation)  # colours and camera jitter
    wrist: bool = False  # also store the wrist camera view
    actions: bool = True  # --no-actions: an ETC-only dataset (novel scenes, no action labels)
    frame_every: int = 1  # keep every n-th step of each rollout (--no-actions only): n x fewer frames to render and store, so more layouts
    max_steps: int = 300  # give up on an episode after this many steps
    post_success: int = 8  # frames kept after the first success, so 'done' is seen
    workers: int = 2  # processes, one World each; results do not depend on this
    seed: int = 0  # fixes every layout, hence the whole dataset
    overwrite: bool = False  # replace an existing dataset at --out

def episode_seed(seed: int, task: str, k: int) -> int:
    """Attempt k of a task: a layout seed independent of worker count and of other tasks."""
    return int(np.random.SeedSequence([seed, sim.TASKS.index(task), k]).generate_state(1)[0])

def eval_seeds(task: str, seed: int, episodes: int) -> list[int]:
    """Evaluation seed `seed`'s layouts, the same for every checkpoint, never collected on."""
    return [episode_seed(10_000 + 1000 * seed + k, task, 0) for k in range(episodes)]

_WORLDS: dict = {}  # per process: the World of the current task, reused across episodes

def close_worlds():
    for w in _WORLDS.values():
        w.close()
    _WORLDS.clear()

def run_episode(job: tuple) -> dict | None:
    """One scripted episode; its per-frame arrays, or None if the expert failed."""
    task, seed, goal, size, variation, wrist, max_steps, post_success, every = job
    key = (task, size, variation, wrist)
    if key not in _WORLDS:
        close_worlds()
        _WORLDS[key] = sim.World(task, size, variation, wrist=wrist)
    w = _WORLDS[key]
    w.seed(seed, goal)
    colors = variation.all_marker_colors()
    rows, success, left = [], False, post_success
    with warnings.catch_warnings():  # the experts warn about their own gains
        warnings.simplefilter("ignore")
        while w.steps < max_steps and left > 0:
            # last: the final frame (the frames after success used up, or out of steps), kept whatever its step
            action, last = w.expert_action(), left == success or w.steps == max_steps - 1
            left -= success  # count the frames shown after the first success
            if w.steps % every and not last:  # simulated, not kept (rendering is most of a frame's cost)
                success = w.step(action) or success
                continue
            objs, c = w.objects(), w.camera
            rows.append(dict(
                images=w.render(), step=w.steps, proprio=w.proprio(), hand=w.hand(), objects=objs, goal=w.goal(),
                hand_px=w.project(w.hand()), objects_px=w.project(objs), goal_px=w.project(w.goal()),
                objects_box=np.stack([w.box(g) for g in w.object_geoms]), hand_box=w.box(w.hand_geoms),
                success=success, contact=w.contact(), camera=np.array([*c.lookat, c.distance, c.azimuth, c.elevation, c.fovy]),
                markers=w.markers, markers_px=w.project(w.markers), goal_marker=w.goal_marker,  # (K, 3), (K, 2), ()
                marker_color=np.array([colors.index(m) for m in w.marker_colors], dtype=int)))  # (K,) into meta's list
            rows[-1]["actions"] = action
            success = w.step(action) or success
    if not success:
        return None
    ep = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    ep["grip"] = ep["actions"][:, 3]  # kept with --no-actions too: ETC's phases need it
    if wrist:  # render() gave (scene, wrist) pairs
        ep["wrist"], ep["images"] = ep["images"][:, 1], ep["images"][:, 0]
    return ep

def goals_per_layout(cfg: Collect, task: str) -> int:
    return cfg.goals_per_layout if task in sim.MARKER_TEXT and cfg.variation.markers else 1

def layout_goal(cfg: Collect, task: str, k: int) -> tuple[int, int | None]:
    """Attempt k's layout seed and named marker. With g goals per layout, attempts k = g*i ... g*i + g-1
    show layout i with marker 0 ... g-1 named: the same image under g colour words and g action
    chunks, so nothing but the word tells the demonstrations apart."""
    g = goals_per_layout(cfg, task)
    return episode_seed(cfg.seed, task, k // g), (k % g if g > 1 else None)

def episode_job(cfg: Collect, task: str, k: int) -> tuple:
    """run_episode's job for attempt k of a task (bench.py times the same jobs)."""
    return (task, *layout_goal(cfg, task, k), cfg.image_size, cfg.variation, cfg.wrist, cfg.max_steps,
            cfg.post_success, cfg.frame_every)

def collect_task_episodes(cfg: Collect, imap, task: str, bar) -> tuple[list[dict], int, int]:
    """The first cfg.episodes (x goals per layout) successful attempts in attempt order; attempts; successes."""
    want = cfg.episodes * goals_per_layout(cfg, task)
    found, k, wins = {}, 0, 0
    while len(found) < want:
        if k > 3 * want + 10:
            raise DataError(f"the {task} expert succeeded on only {len(found)} of {k} layouts "
                            f"within --max-steps {cfg.max_steps}; raise it or drop the task")
        need = want - len(found)
        ks = range(k, k + need + max(2, need // 10))  # a few spares: experts fail ~2%
        jobs = [episode_job(cfg, task, i) for i in ks]
        for i, ep in zip(ks, imap(run_episode, jobs)):
            wins += ep is not None
            if ep is not None and len(found) < want:
                found[i] = ep
                bar.update(1)
            bar.set_postfix(task=task, attempts=i + 1, refresh=False)
        k = ks.stop
    return [found[i] for i in sorted(found)], k, wins

def normalisation_stats(x: np.ndarray) -> dict:
    """Per-dimension mean/std/min/max/1st and 99th percentile of (N, D) data, as lists."""
    q01, q99 = np.quantile(x, [0.01, 0.99], axis=0)
    return {k: v.astype(float).round(6).tolist() for k, v in dict(
        mean=x.mean(0), std=x.std(0) + 1e-6, min=x.min(0), max=x.max(0), q01=q01, q99=q99).items()}

def collect(cfg: Collect) -> Path:
    """Collect, then write the dataset atomically: a temporary folder renamed into place."""
    tasks = [sim.check_task(t) for t in cfg.tasks]
    check_positive(episodes=cfg.episodes, workers=cfg.workers, max_steps=cfg.max_steps)
    if cfg.image_size < 16 or cfg.image_size % 16:  # the tiny VLM's size (one token per 16 px patch)
        raise DataError(f"--image-size {cfg.image_size}: use a multiple of the tiny VLM's 16 px patch, e.g. 64 or 96")
    color = cfg.variation.color_word()  # validates the colours before any work
    for c in filter(None, [cfg.variation.table_color, *cfg.variation.all_marker_colors()]):
        sim.parse_color(c)
    if not 1 <= cfg.goals_per_layout <= max(cfg.variation.markers, 1):
        raise DataError(f"--goals-per-layout {cfg.goals_per_layout}: use 1 to --variation.markers ({cfg.variation.markers})")
    if cfg.frame_every not in (1, 2, 4) or (cfg.frame_every > 1 and cfg.actions):
        raise DataError(f"--frame-every {cfg.frame_every}: use 1, 2 or 4 (ETC's horizons are 4 steps), and above 1 "
                        "only with --no-actions (an action chunk needs consecutive steps)")
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    meta = dict(format_version=FORMAT_VERSION, tasks={}, image_size=cfg.image_size,
                has_actions=cfg.actions, variation=asdict(cfg.variation), color=color,
                marker_colors=cfg.variation.all_marker_colors() if cfg.variation.markers else [],
                camera=asdict(sim.Camera()), wrist=cfg.wrist, seed=cfg.seed, frame_every=cfg.frame_every)
    # spawned workers: fresh processes, no OpenGL state inherited through fork
    pool = mp.get_context("spawn").Pool(cfg.workers) if cfg.workers > 1 else None
    try:
        with tqdm(total=sum(cfg.episodes * goals_per_layout(cfg, t) for t in tasks), desc="episodes", unit="ep") as bar:
            for task in tasks:
                eps, attempts, wins = collect_task_episodes(cfg, pool.imap if pool else map, task, bar)
                arrays = {k: np.concatenate([e[k] for e in eps]) for k in eps[0]}
                arrays["episode"] = np.concatenate([np.full(len(e["images"]), i) for i, e in enumerate(eps)])
                if not cfg.actions:
                    del arrays["actions"]  # OOD scenes: never an action label
                (tmp / task).mkdir()
                for k, v in arrays.items():
                    np.save(tmp / task / f"{k}.npy", v)
                meta["tasks"][task] = dict(
                    frames=len(arrays["images"]), episodes=len(eps), attempts=attempts,
                    expert_success=round(wins / attempts, 3), instructions=sim.instructions(task, color, "all"),
                    seeds=[layout_goal(cfg, task, i)[0] for i in range(attempts)])
        meta["stats"] = {k: normalisation_stats(np.concatenate([np.load(tmp / t / f"{k}.npy") for t in tasks]))
                         for k in ("proprio", "actions")[:1 + cfg.actions]}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    except BaseException:
        shutil.rmtree(tmp)  # a failed or interrupted run leaves nothing behind
        raise
    finally:
        pool.terminate() if pool else close_worlds()
    replace_dir(tmp, out)
    return out

def replace_dir(tmp: Path, out: Path):
    """Move a finished folder into place; an old one at `out` goes only once the new one is there."""
    old = out.rename(out.with_name(f".{out.name}.old")) if out.exists() else None
    tmp.rename(out)
    if old:
        shutil.rmtree(old)

# --- Loading ----------------------------------------------------------------------------------
class Dataset:
    """A collected dataset: meta.json plus memory-mapped arrays per task."""
    def __init__(self, path: str | Path, image_size: int | None = None):
        self.path = Path(path)
        if not (self.path / "meta.json").is_file():
            raise DataError(f"no dataset at {self.path}: run `python data.py collect --out {self.path}`")
        try:
            self.meta = json.loads((self.path / "meta.json").read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{self.path}/meta.json is corrupt ({err}); collect the dataset again") from None
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{self.path} has format {self.meta.get('format_version')}, this code "
                            f"reads {FORMAT_VERSION}; collect it again")
        if image_size is not None and self.meta["image_size"] != image_size:
            raise DataError(f"{self.path} has {self.meta['image_size']} px images, the model expects "
                            f"{image_size}; collect with --image-size {image_size}")
        self.tasks = list(self.meta["tasks"])
        self.marker_words = [sim.parse_color(c)[0] for c in self.meta["marker_colors"]]  # marker_color indexes these
        if not self.tasks:
            raise DataError(f"{self.path} is empty; collect it again")
        names = ARRAYS + ("actions",) * self.meta["has_actions"] + ("wrist",) * self.meta["wrist"]
        self.arrays = {t: {k: self._load(t, k) for k in names} for t in self.tasks}

    def _load(self, task: str, key: str) -> np.ndarray:
        f = self.path / task / f"{key}.npy"
        try:
            a = np.load(f, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise DataError(f"{f} is missing or corrupt ({err}); collect the dataset again") from None
        if len(a) != self.meta["tasks"][task]["frames"]:
            raise DataError(f"{f} has {len(a)} rows, meta.json says {self.meta['tasks'][task]['frames']}; "
                            "collect the dataset again")
        return a

    def episode_frames(self, task: str) -> list[np.ndarray]:
        """Frame indices of each episode, in order."""
        ep = np.asarray(self.arrays[task]["episode"])
        return np.split(np.arange(len(ep)), np.flatnonzero(np.diff(ep)) + 1)

# --- Mixing: which samples a batch holds ------------------------------------------------------
@dataclass(frozen=True)
class Ramp:
    """A value that goes from `start` to `end` over `steps` (held after): the ETC fraction
    of a batch, or the action-loss weight. kind: constant (start throughout), linear, cosine."""
    kind: Literal["constant", "linear", "cosine"] = "constant"
    start: float = 0.5
    end: float = 0.5
    steps: int = 1000

    def __call__(self, step: int) -> float:
        x = min(max(step / max(self.steps, 1), 0.0), 1.0)
        w = {"constant": 0.0, "linear": x, "cosine": 0.5 * (1 - math.cos(math.pi * x))}[self.kind]
        return self.start + (self.end - self.start) * w

def cumulative(w: np.ndarray) -> np.ndarray:
    """Weights (N,) -> their normalised cumulative sum (N,), as numpy's choice(p=...) builds it."""
    cdf = (w / w.sum()).cumsum()
    return cdf / cdf[-1]

class MixedSampler:
    """Batch b's contents depend only on (seed, b): resuming at any step is exact. The ETC count
    is f*B rounded stochastically (unbiased), so the fraction seen follows the schedule on
    average. ETC records are drawn by level (level_weights: each level's share of the ETC), then
    within the level in proportion to their kind's weight (kind_weights, default 1: uniformly).
    A kind weight of 8 makes each of that kind's records 8 times as likely as another of its level:
    how one kind of question (e.g. the markers') gets more of the batch without more data."""
    def __init__(self, etc_levels: list[str], n_action: int, batch_size: int, etc_fraction: Ramp,
                 level_weights: dict[str, float] | None = None, seed: int = 0,
                 etc_kinds: list[str] | None = None, kind_weights: dict[str, float] | None = None):
        self.B, self.n_action, self.schedule, self.seed = batch_size, n_action, etc_fraction, seed
        levels = np.array(etc_levels)
        weights = level_weights or dict.fromkeys(etc_levels, 1.0)  # in order of first appearance
        kw = np.array([kind_weights.get(k, 1.0) for k in etc_kinds]) if kind_weights else np.ones(len(levels))  # (N,)
        self.by_level = {lv: np.flatnonzero((levels == lv) & (kw > 0)) for lv, w in weights.items() if w > 0}
        self.by_level = {lv: ids for lv, ids in self.by_level.items() if len(ids)}
        w = np.array([weights[lv] for lv in self.by_level])
        self.p = w / w.sum() if len(w) else w
        # within a level: uniform (None) unless kinds are weighted, then by the weights' cumulative sum,
        # computed once here, not for every record drawn (rng.choice(p=...) would redo it each time)
        self.cdf = {lv: cumulative(kw[ids]) if kind_weights else None for lv, ids in self.by_level.items()}

    def draw(self, level: str, rng: np.random.Generator) -> int:
        """One record of `level`: what rng.choice(ids, p=weights) gives, from the cdf kept."""
        ids, cdf = self.by_level[level], self.cdf[level]
        return rng.choice(ids) if cdf is None else ids[cdf.searchsorted(rng.random(), side="right")]

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(ETC record indices, action sample indices) for this step."""
        rng = np.random.default_rng([self.seed, step])
        f = self.schedule(step) if self.by_level else 0.0
        f = f if self.n_action else 1.0
        n_etc = int(f * self.B) + int(rng.random() < f * self.B % 1)
        levels = list(self.by_level)
        picks = rng.choice(len(levels), size=n_etc, p=self.p) if n_etc else np.zeros(0, int)
        etc = np.array([self.draw(levels[j], rng) for j in picks], dtype=int)
        act = rng.integers(self.n_action, size=self.B - n_etc) if self.n_action else np.zeros(0, int)
        return etc, act

# --- Samples and collation --------------------------------------------------------------------
def goal_word(ds: Dataset, task: str, i: int) -> str | None:
    """The colour word of frame i's goal marker (None without markers), as its instruction names it."""
    a = ds.arrays[task]
    k = int(a["goal_marker"][i])
    return ds.marker_words[a["marker_color"][i, k]] if k >= 0 else None

def moves_object(task: str, goal_marker: int) -> bool:
    """Whether the goal step writes the object's pixel too (etc.goal_answer): a marker task whose object goes to the marker."""
    return goal_marker >= 0 and not task.startswith("reach")

class ActionSamples:
    """(image, instruction, proprio, action chunk) samples of every frame with actions."""
    def __init__(self, ds: Dataset, chunk: int, paraphrases: str = "train", stats: dict | None = None):
        # stats: a policy keeps the normalisation it was first trained with (stage 3: stage 2's)
        if not ds.meta["has_actions"]:
            raise DataError(f"{ds.path} was collected with --no-actions; it can only give ETC")
        self.ds, self.chunk, self.paraphrases = ds, chunk, paraphrases
        self.index = [(t, i) for t in ds.tasks for i in range(ds.meta["tasks"][t]["frames"])]
        st = stats or ds.meta["stats"]
        self.a_mean, self.a_std = np.array(st["actions"]["mean"]), np.array(st["actions"]["std"])
        self.p_mean, self.p_std = np.array(st["proprio"]["mean"]), np.array(st["proprio"]["std"])

    def __len__(self):
        return len(self.index)

    def __call__(self, j: int, rng: np.random.Generator) -> dict:
        task, i = self.index[j]
        a = self.ds.arrays[task]
        ep = np.asarray(a["episode"][i:i + self.chunk])
        acts = np.asarray(a["actions"][i:i + self.chunk])[ep == ep[0]]  # stop at the episode's end
        pad = self.chunk - len(acts)
        acts = np.concatenate([acts, np.repeat(acts[-1:], pad, 0)])  # hold the last action
        word = goal_word(self.ds, task, i)
        texts = sim.instructions(task, self.ds.meta["color"], self.paraphrases, marker=word)
        k, size = int(a["goal_marker"][i]), self.ds.meta["image_size"]
        goal_px = a["markers_px"][i, k] if k >= 0 else a["goal_px"][i]  # the goal the instruction names, (2,)
        # goal: etc.goal_answer's arguments (the goal step's teacher forcing); collate ignores it
        goal = dict(task=task, word=word, goal_uv=np.clip(goal_px, 0, size - 1),
                    object_uv=np.clip(a["objects_px"][i, 0], 0, size - 1) if moves_object(task, k) else None)
        return dict(goal=goal, image=np.asarray(a["images"][i]), text=texts[rng.integers(len(texts))] + "\n",
                    proprio=((a["proprio"][i] - self.p_mean) / self.p_std).astype(np.float32),
                    actions=((acts - self.a_mean) / self.a_std).astype(np.float32),
                    action_mask=np.arange(self.chunk) < self.chunk - pad,
                    noise=rng.standard_normal(acts.shape).astype(np.float32),  # flow-matching eps and
                    time_u=np.float32(rng.random()))  # the uniform draw behind its time t

def collate(samples: list[dict], tokenizer, image_ids: list[int]) -> dict:
    """Token ids, masks and tensors for samples of one kind (ETC or action): each sequence is
    what the tokenizer puts first itself (<bos> for ours and Llama's, nothing for SmolVLM's) +
    image_ids (the VLM's image tokens) + prompt (+ answer + eos), as SmolVLM's processor lays out
    "<image>" + prompt; the answer is encoded with a space in front, so that its first word or
    number is the same token as anywhere in a prompt; right-padded, labels -100 but on the answer and its eos:
        ids    = [bos I I I q q q a a eos pad]
        labels = [ -   - - - - - - a a eos  - ]"""
    seqs, labs = [], []
    lead = tokenizer("")["input_ids"]
    for s in samples:
        prompt = lead + list(image_ids) + tokenizer(s["text"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + s["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] if "answer" in s else []
        seqs.append(prompt + answer)
        labs.append([-100] * len(prompt) + answer)
    L = max(map(len, seqs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = dict(
        input_ids=torch.tensor([s + [pad] * (L - len(s)) for s in seqs]),
        attention_mask=torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs]),
        labels=torch.tensor([lb + [-100] * (L - len(lb)) for lb in labs]))
    for k in ("image", "proprio", "actions", "action_mask", "noise", "time_u"):
        if k in samples[0]:  # images (B, H, W, 3) uint8; none in a text-only probe (experiments/binding.py)
            batch["images" if k == "image" else k] = torch.from_numpy(np.stack([s[k] for s in samples]))
    return batch

class Batches:
    """The collated (ETC batch, action batch) of a step and the global batch's ETC fraction.
    The global batch depends only on (seed, step); DDP process `rank` takes every world_size-th
    sample of it. etc: ETC samples (etc.Samples: `levels`, `kinds`, len, etc(j) -> sample), or None."""
    def __init__(self, etc, actions: ActionSamples | None, tokenizer, image_ids: list[int], batch_size: int,
                 etc_fraction: Ramp, level_weights: dict[str, float] | None = None, seed: int = 0,
                 kind_weights: dict[str, float] | None = None):
        self.etc, self.actions, self.tokenizer, self.image_ids, self.seed = etc, actions, tokenizer, image_ids, seed
        self.sampler = MixedSampler(etc.levels if etc else [], len(actions) if actions else 0, batch_size, etc_fraction,
                                    level_weights, seed, etc.kinds if etc else None, kind_weights)

    def __call__(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[dict | None, dict | None, float]:
        e, a = self.sampler.batch(step)
        etc = [self.etc(i) for i in e[rank::world_size]]
        # an action sample's paraphrase, flow noise and time depend on its place in the global
        # batch, not on the rank that holds it: any number of processes sees the same batch
        act = [self.actions(a[k], np.random.default_rng([self.seed, step, k])) for k in range(rank, len(a), world_size)]
        return (collate(etc, self.tokenizer, self.image_ids) if etc else None,
                collate(act, self.tokenizer, self.image_ids) if act else None, len(e) / (len(e) + len(a)))

def cli(run, config, args: list[str] | None = None):
    """Run the command line parsed into `config` (a dataclass or {sub-command: dataclass}). Bad
    input the user can fix (DataError, CheckpointError, an unknown task or colour, a diverged
    run) prints one line and exits 2, so a pipeline can tell it from a crash."""
    try:
        run(tyro.extras.subcommand_cli_from_dict(config, args=args) if isinstance(config, dict) else tyro.cli(config, args=args))
    except (ValueError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

if __name__ == "__main__":
    cli(lambda cmd: print(collect(cmd)), {"collect": Collect})
