"""Evaluation: closed-loop success, the grounding probe, ETC question accuracy, representation drift.

    python eval.py success --ckpt out/stage3                    # target scene, 3 seeds x 10 layouts per task
    python eval.py success --ckpt out/sdm --object-colors yellow "0,128,255" \\
        --instruction "push the yellow puck to the green dot"   # any colour, any instruction text
    python eval.py grounding --ckpt out/stage3                  # does the first chunk go where the colour word says?
    python eval.py etc --ckpt out/stage2                        # ETC accuracy per level, held-out frames
    python eval.py cka --a out/stage1 --b out/stage2            # layer-wise linear CKA between two checkpoints

Each command writes out/eval/<name>.json, which `python report.py` turns into tables.
"""
import itertools, json, multiprocessing as mp, os, re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np, torch
from tqdm import tqdm

import data, etc, model, scaffold, sim

@dataclass
class Success:
    """Closed-loop success over tasks x scene conditions x seeds."""
    ckpt: str = "out/stage3"  # any checkpoint: a teacher samples with --steps (default its own), a student with 1
    data: str = "data/target"  # the tasks and the base scene come from this dataset's meta.json
    tasks: tuple[str, ...] = ()  # () = the dataset's tasks; any of the 50 names
    object_colors: tuple[str, ...] = ()  # object colours to test: names, "r,g,b" or "name=r,g,b"; () = the dataset's
    table_colors: tuple[str, ...] = ()  # table colours to test, same forms; () = the dataset's
    camera_jitter: float | None = None  # degrees of random camera offset per episode (default: the dataset's)
    goal_colors: tuple[str, ...] | None = None  # with markers: the goal's colour words (novel ones: OOD); default the dataset's
    ambiguous: float | None = None  # with markers: chance of two goals of the named colour; default the dataset's
    instruction: str | None = None  # one instruction text for every task and episode; default: the layout's own
    mode: Literal["right", "empty", "wrong"] = "right"  # with markers: name the goal's colour, nothing, another's
    paraphrases: Literal["train", "heldout"] = "train"  # without --instruction: template or held-out paraphrase
    seeds: tuple[int, ...] = (0, 1, 2)  # evaluation seeds; success is reported as mean +- std over them
    episodes: int = 10  # fresh layouts per task, condition and seed (never used for collection)
    steps: int | None = None  # Euler steps per chunk; default the checkpoint's (10 teacher, 1 student)
    execute: int = 8  # actions run from each chunk before re-planning (receding horizon)
    max_steps: int = 200  # environment steps per episode
    workers: int = 2  # processes, each with one environment and a copy of the policy
    gifs: int = 1  # rollout GIFs per task and condition (from the first seed)
    name: str | None = None  # results file stem; default: the checkpoint's folder name
    out: str = "out/eval"

@dataclass
class Grounding:
    """Does the policy read the colour word? Each marker named in turn on fresh layouts, the first
    chunk compared with the scripted expert's toward each marker: no rollouts, a minute on a CPU."""
    ckpt: str = "out/stage3"
    data: str = "data/target"  # the scene (with its goal markers) comes from this dataset's meta.json
    tasks: tuple[str, ...] = ("reach", "push")  # the grounded tasks
    goal_colors: tuple[str, ...] | None = None  # one marker per layout in these colours (novel words: OOD); default the dataset's
    paraphrases: Literal["train", "heldout"] = "train"  # the instruction template or the held-out paraphrase
    layouts: int = 30  # fresh layouts per task (evaluation seed 0's, as in `success`)
    draws: int = 4  # noise draws per named marker, the same for every word
    steps: int | None = None  # Euler steps per chunk; default the checkpoint's
    name: str | None = None  # results file stem; default grounding_<checkpoint folder>
    out: str = "out/eval"

@dataclass
class EtcAccuracy:
    """Vision-language retention: ETC question accuracy per level on held-out frames."""
    ckpt: str = "out/stage3"
    data: tuple[str, ...] = ("data/source",)  # datasets whose held-out ETC records are asked
    holdout: int = 10  # every holdout-th episode is held out, as in training
    limit: int = 600  # records asked (an even spread over the held-out ones)
    name: str | None = None
    out: str = "out/eval"

@dataclass
class Cka:
    """Representation drift: linear CKA per VLM layer between two checkpoints on fixed inputs."""
    a: str = "out/stage1"
    b: str = "out/stage2"
    data: str = "data/source"  # probe frames (held-out episodes) with their ETC questions
    frames: int = 128
    name: str | None = None
    out: str = "out/eval"

# --- Closed-loop success ----------------------------------------------------------------------
LABELLED = ("object_color", "table_color", "camera_jitter", "markers", "goal_colors", "ambiguous")  # a condition's name
POLICY = {}  # per worker process: the loaded checkpoint

def init_worker(ckpt: str, steps: int | None):
    torch.set_num_threads(1)  # one core per worker: the workers are the parallelism
    POLICY["vla"], POLICY["steps"] = model.load(ckpt), steps

def run_job(job: tuple) -> tuple:
    """One (task, condition, seed) block of episodes -> (job, [(success, named, between) per
    episode], frames or None, the instruction texts)."""
    task, cond, seed, cfg = job
    vla, variation, texts = POLICY["vla"], sim.Variation(**cond), []

    def instruction(world: sim.World) -> tuple[str, int]:  # this layout's, or the one given
        text, named = world.instruction(cfg.mode, cfg.paraphrases)
        texts.append(text if cfg.instruction is None else cfg.instruction)
        return texts[-1], named
    frames = [] if seed == cfg.seeds[0] and cfg.gifs else None
    ok = scaffold.run_policy(scaffold.policy(vla, POLICY["steps"]), task, data.eval_seeds(task, seed, cfg.episodes), instruction,
                        variation, vla.cfg.image_size, cfg.max_steps, cfg.execute, frames)
    return (task, cond, seed), ok, (frames[:cfg.gifs] if frames else None), sorted(set(texts))

def summarise(outcomes: dict) -> dict:
    """{(task, condition, seed): [(success, named, between) per episode]} -> per (task, condition):
    the success rate of each seed, their mean and std (over seeds), the episode count; with
    markers the rate of ending at the named marker, and of ending between two alike goals (of
    the ambiguous episodes); per condition the success over the task-mean."""
    rows = {}
    rate = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    for (task, cond, seed), eps in sorted(outcomes.items()):
        r = rows.setdefault((task, cond), dict(task=task, condition=cond, per_seed=[], episodes=0, outcomes=[]))
        r["per_seed"].append(float(np.mean([ok for ok, _, _ in eps])))
        r["episodes"], r["outcomes"] = r["episodes"] + len(eps), r["outcomes"] + eps
    for r in rows.values():
        r["mean"], r["std"] = float(np.mean(r["per_seed"])), float(np.std(r["per_seed"]))
        eps = r.pop("outcomes")
        r["named"], r["between"] = (rate([e[j] for e in eps if e[j] is not None]) for j in (1, 2))
    overall = {}
    for cond in sorted({c for _, c in rows}):
        per_seed = np.mean([r["per_seed"] for (t, c), r in rows.items() if c == cond], axis=0)  # (seeds,)
        overall[cond] = dict(mean=float(per_seed.mean()), std=float(per_seed.std()))
    return dict(rows=list(rows.values()), overall=overall)

def success_markdown(summary: dict, title: str) -> str:
    f = lambda x: "" if x is None else f"{x:.2f}"  # noqa: E731
    lines = [f"**{title}**", "", "| task | condition | success (mean +- std over seeds) | at the named marker | "
             "between two goals | episodes |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['condition']} | {r['mean']:.2f} +- {r['std']:.2f} | {f(r['named'])} | {f(r['between'])} | "
              f"{r['episodes']} |" for r in summary["rows"]]
    lines += [f"| **mean** | {c} | **{o['mean']:.2f} +- {o['std']:.2f}** | | | |" for c, o in summary["overall"].items()]
    return "\n".join(lines) + "\n"

def write_result(out: Path, result: dict):  # out/<name>.json: what report.py reads back
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{result['name']}.json").write_text(json.dumps(result, indent=1))

def write_gif(path: Path, frames: list[np.ndarray], scale: int = 3):
    from PIL import Image
    images = [Image.fromarray(f.repeat(scale, 0).repeat(scale, 1)) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=50, loop=0)

def success(cfg: Success) -> dict:
    data.check_positive(episodes=cfg.episodes, max_steps=cfg.max_steps, workers=cfg.workers, execute=cfg.execute)
    for c in cfg.object_colors + cfg.table_colors + (cfg.goal_colors or ()):
        sim.parse_color(c)  # an unknown colour or task stops here, with the list of valid ones
    ds = data.Dataset(cfg.data)
    tasks = [sim.check_task(t) for t in cfg.tasks] or ds.tasks
    vla = model.load(cfg.ckpt)  # fails clearly before any worker starts
    scaffold.require_trained_head(cfg.ckpt, "evaluate a policy trained on actions (`python train_vla.py --stage 2`), "
                                            "or its ETC answers with `python eval.py etc`")
    if vla.cfg.image_size != ds.meta["image_size"]:
        raise model.CheckpointError(f"{cfg.ckpt} takes {vla.cfg.image_size} px images; {cfg.data} has {ds.meta['image_size']} px")
    given = {k: getattr(cfg, k) for k in ("camera_jitter", "goal_colors", "ambiguous") if getattr(cfg, k) is not None}
    base = {**asdict(sim.Variation(**ds.meta["variation"])), **given}
    conds = [dict(base, object_color=o, table_color=t) for o, t in itertools.product(
        cfg.object_colors or [base["object_color"]], cfg.table_colors or [base["table_color"]])]
    label = lambda c: ", ".join(f"{k.split('_')[0]} {'/'.join(map(str, c[k])) if isinstance(c[k], (list, tuple)) else c[k]}"
                                for k in LABELLED if c[k]) or "default"  # noqa: E731
    jobs = [(t, c, s, cfg) for t in tasks for c in conds for s in cfg.seeds]
    name, out, outcomes, texts = cfg.name or Path(cfg.ckpt).name, Path(cfg.out), {}, {}
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")  # a fresh interpreter per worker: MuJoCo/EGL state is not fork-safe
    with ctx.Pool(cfg.workers, init_worker, (cfg.ckpt, cfg.steps)) as pool, tqdm(total=len(jobs) * cfg.episodes, desc=name) as bar:
        for (task, cond, seed), ok, frames, text in pool.imap_unordered(run_job, jobs):
            outcomes[(task, label(cond), seed)] = ok
            texts[task] = sorted(set(texts.get(task, []) + text))
            bar.update(len(ok))
            for i, f in enumerate(frames or []):
                slug = re.sub(r"[^a-z0-9]+", "-", f"{name} {task} {label(cond)} {i}".lower()).strip("-")
                write_gif(out / f"{slug}.gif", f)
    summary = summarise(outcomes)
    result = dict(kind="success", name=name, ckpt=cfg.ckpt, steps=cfg.steps or vla.cfg.steps,
                  instructions=texts, config=asdict(cfg), **summary,
                  episodes=[dict(task=t, condition=c, seed=s, **dict(zip(("success", "named", "between"), map(list, zip(*e)))))
                            for (t, c, s), e in sorted(outcomes.items())])
    write_result(out, result)
    md = success_markdown(summary, f"{name}: {cfg.ckpt}, {result['steps']} step(s) per chunk")
    (out / f"{name}.md").write_text(md)
    print(md)
    return result

def grounding(cfg: Grounding) -> dict:
    data.check_positive(layouts=cfg.layouts, draws=cfg.draws)
    vla, ds = model.load(cfg.ckpt), data.Dataset(cfg.data)
    scaffold.require_trained_head(cfg.ckpt, "probe a policy trained on actions (`python train_vla.py --stage 2`)")
    variation = sim.Variation(**{**ds.meta["variation"], **({} if cfg.goal_colors is None else dict(goal_colors=cfg.goal_colors))})
    tasks = [sim.check_task(t) for t in cfg.tasks]
    if not variation.markers or any(t not in sim.MARKER_TEXT for t in tasks):
        raise data.DataError(f"the probe needs goal markers: a dataset collected with --variation.markers 3 "
                             f"(not {cfg.data}) and tasks among {', '.join(sim.MARKER_TEXT)}")
    novel = {sim.parse_color(c)[0] for c in variation.goal_colors}  # an unknown colour stops here, the forms named
    act = scaffold.policy(vla, cfg.steps)
    noise = torch.randn(cfg.draws, vla.cfg.chunk, vla.cfg.action_dim, generator=torch.Generator().manual_seed(0))
    rows = {t: scaffold.grounding_probe(lambda im, texts, pr: act(im, texts, pr, noise), t, data.eval_seeds(t, 0, cfg.layouts),
                                        variation, vla.cfg.image_size, vla.cfg.chunk, cfg.paraphrases,
                                        ask=lambda samples: scaffold.answers(vla, samples)) for t in tasks}
    rate = lambda rs, key="hit": float(np.mean([r[key] for r in rs])) if rs else None  # noqa: E731
    summary = {t: dict(named=rate(rs), novel=rate([r for r in rs if r["word"] in novel]), chance=1 / variation.markers,
                       vlm_named=rate(rs, "vlm_hit"),
                       novel_when_other_named=pulled(rs, novel),
                       named_by_word={w: rate([r for r in rs if r["word"] == w]) for w in sorted({r["word"] for r in rs})})
               for t, rs in rows.items()}
    name = cfg.name or f"grounding_{Path(cfg.ckpt).name}"
    result = dict(kind="grounding", name=name, ckpt=cfg.ckpt, summary=summary, rows=rows, config=asdict(cfg))
    write_result(Path(cfg.out), result)
    print(json.dumps(summary))
    return result

def layouts(rows: list[dict]) -> list[list[dict]]:
    """The probe's rows per layout (its seed), each layout's in marker order."""
    out = {}
    for r in rows:
        out.setdefault(r["seed"], []).append(r)
    return list(out.values())

def pulled(rows: list[dict], novel: set[str]) -> float | None:
    """How often draws head for a layout's novel-word marker when another marker is named: a policy
    drawn to the new colour whatever the word scores 1.0 on the novel words without reading them."""
    hits = [n == j for lay in layouts(rows) for j, x in enumerate(lay) if x["word"] in novel
            for r in lay if r["word"] not in novel for n in r["nearest"]]
    return float(np.mean(hits)) if hits else None

# --- ETC accuracy and representation drift ----------------------------------------------------
def etc_accuracy(cfg: EtcAccuracy) -> dict:
    data.check_positive(limit=cfg.limit)
    vla = model.load(cfg.ckpt)
    recs = [item for h in etc.load(cfg.data, holdout=cfg.holdout, image_size=vla.cfg.image_size)[1] for item in h]
    if not recs:
        raise data.DataError(f"no held-out ETC records in {cfg.data} (every {cfg.holdout}th episode); lower --holdout")
    recs = recs[::max(1, len(recs) // cfg.limit)][:cfg.limit]
    answers = scaffold.etc_answers(vla, recs)
    scores, kinds = (etc.scores([r for _, r in recs], answers, by=by) for by in ("level", "kind"))
    name = cfg.name or f"etc_{Path(cfg.ckpt).name}"
    result = dict(kind="etc", name=name, ckpt=cfg.ckpt, records=len(recs), scores=scores, kinds=kinds, config=asdict(cfg))
    write_result(Path(cfg.out), result)
    print(json.dumps(result["scores"]))
    return result

def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of two representations of the same n inputs,
    x: (n, d1), y: (n, d2):  ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) after centring the
    columns. 1 for the same representation up to rotation and scale; ~0 for unrelated ones."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))

@torch.no_grad()
def hidden_states(vla: model.VLA, batch: dict) -> list[torch.Tensor]:
    """Per VLM text layer (embeddings first), the states of every real token: (n_tokens, width)."""
    out = vla.vlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=model.pixels(vla.vlm, batch["images"]), output_hidden_states=True)
    keep = batch["attention_mask"].bool()
    return [h[keep].float() for h in out.hidden_states]

def cka(cfg: Cka) -> dict:
    a, b = model.load(cfg.a), model.load(cfg.b)
    ds = data.Dataset(cfg.data, image_size=a.cfg.image_size)
    recs = [r for r in etc.read(ds.path / "etc.jsonl") if etc.held_out(r, 10)]
    recs = recs[::max(1, len(recs) // cfg.frames)][:cfg.frames]
    if not recs:
        raise data.DataError(f"{cfg.data} has no held-out ETC records to probe with; run `python etc.py --data {cfg.data}`")
    samples = [dict(image=etc.sample(ds, r)["image"], text=etc.prompt(r["question"])) for r in recs]  # questions only
    batch = data.collate(samples, a.tokenizer, a.image_ids)
    layers = [linear_cka(x, y) for x, y in zip(hidden_states(a, batch), hidden_states(b, batch))]
    name = cfg.name or f"cka_{Path(cfg.a).name}_{Path(cfg.b).name}"
    result = dict(kind="cka", name=name, a=cfg.a, b=cfg.b, frames=len(recs), layers=layers, config=asdict(cfg))
    write_result(Path(cfg.out), result)
    print(name, " ".join(f"{v:.3f}" for v in layers))
    return result

COMMANDS = dict(success=Success, grounding=Grounding, etc=EtcAccuracy, cka=Cka)
RUN = {Success: success, Grounding: grounding, EtcAccuracy: etc_accuracy, Cka: cka}

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    data.cli(lambda cmd: RUN[type(cmd)](cmd), COMMANDS)
