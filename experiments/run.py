"""Experiments: one command per paper claim, a grid of cells x training seeds -> results/<table>/.

    python experiments/run.py table1                # the ETC paper's Table 1 analogue, 3 training seeds
    python experiments/run.py sdm --seeds 0         # one training seed
    python experiments/run.py ood --dry-run         # print the commands, run nothing
    python experiments/run.py binding --seeds 0     # the binding benchmark's curves (experiments/binding.py)
    python report.py --readme README.md             # every table, with 95% intervals and verdicts

A table is a set of cells, each evaluating one training run (a script, its arguments, the run
it starts from: RUNS). The runs are shared by every cell and every table that needs them, so
`table1` after `ood` trains only what `ood` did not. Checkpoints go to runs/s<seed>/<run>/ (not
committed): a finished run is skipped, one cut off resumes exactly. Each evaluation writes
results/<table>/<cell>.s<seed>.<eval>.json (committed) and is skipped when it exists, so a
table can be built over several sittings. Every cell of a table is evaluated on the same fixed
layouts (eval.py's evaluation seeds). The datasets are the pipeline's grounded world (`bash
pipeline.sh data` makes them when they are missing).
"""
import hashlib, json, os, shlex, subprocess, sys, time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import tyro

ROOT = Path(__file__).resolve().parents[1]
NOVEL = ("teal=0,0.5,0.5", "lime=0.6,1,0.2")  # the pipeline's novel goal colour words (OOD ETC only)
GROUNDED = ("--tasks", "reach", "push")
# Evaluations: eval.py arguments (the checkpoint, seeds, episodes and output are added).
EVALS = dict(
    source=("success", "--data", "data/source"),  # in-domain, the stage-2 scene
    target=("success", "--data", "data/target"),  # in-domain, the stage-3 scene
    ood=("success", *GROUNDED, "--goal-colors", *NOVEL, "--paraphrases", "heldout"),  # novel words, held-out phrasings
    ood_source=("success", *GROUNDED, "--data", "data/source", "--goal-colors", *NOVEL, "--paraphrases", "heldout"),
    uni=("success", *GROUNDED, "--ambiguous", "0"),  # one goal of the named colour
    amb=("success", *GROUNDED, "--ambiguous", "1"),  # two goals of the named colour (multimodal)
    etc=("etc",),  # ETC answer accuracy on held-out source frames (retention)
)
ACT = ("--etc-start", "0", "--etc-end", "0")  # no ETC in the batch: action data only
ACT2 = (*ACT, "--no-goal-step")  # stage 2: no language at all (stage 3 keeps its checkpoint's goal step)
S1 = ("train_etc.py", None, ())
# Stage 2 at 1000 steps (the pipeline's 3000 would put a table at ~4 h on 2 cores); stage 3 and the rest at theirs.
S2, S3 = ("--stage", "2", "--steps", "1000"), ("--stage", "3")

# Training runs: name -> (script, the run it starts from ("base" = the base VLM), arguments). The runs
# are shared by every table: one stage 1, one stage 2 and one stage 3 per seed serve all the tables that
# need them, so tables built one after another do not retrain them, and their cells compare the same
# checkpoints (the ood table's "+ OOD ETC" is the sdm table's teacher and the stages table's 1+2+3).
RUNS = dict(
    stage1=S1,
    s2=("train_vla.py", "stage1", S2),  # stage 2 with ETC, from Distribution Bridging (the pipeline's recipe)
    s2_act=("train_vla.py", "stage1", (*S2, *ACT2)),  # ... action data only
    s2_scene=("train_vla.py", "stage1", (*S2, "--levels", "scene")),  # ... with scene-level ETC only
    s2_task=("train_vla.py", "stage1", (*S2, "--levels", "scene", "task")),  # ... scene and task levels
    s2_base=("train_vla.py", "base", S2),  # stage 2 with ETC, from the base VLM (no stage 1)
    s2_act_base=("train_vla.py", "base", (*S2, *ACT2)),  # ... action data only
    s3=("train_vla.py", "s2", S3),  # stage 3 with in-domain and OOD ETC (the pipeline's recipe)
    s3_act=("train_vla.py", "s2", (*S3, *ACT)),  # ... action data only
    s3_id_etc=("train_vla.py", "s2", (*S3, "--etc-data", "data/target")),  # ... in-domain ETC only
    s3_none=("train_vla.py", "s2_act_base", (*S3, *ACT)),  # ETC in no stage
    s3_only2=("train_vla.py", "s2_base", (*S3, *ACT)),  # ETC in stage 2 only
    s3_only3=("train_vla.py", "s2_act_base", S3),  # ETC in stage 3 only
    s3_both=("train_vla.py", "s2_base", S3),  # ETC in stages 2 and 3 (no stage 1)
    sdm=("distill_sdm.py", "s3", ()),
    cd=("distill_sdm.py", "s3", ("--method", "cd")),
)
# cells: name -> (label, run, extra eval.py arguments); columns: "<eval>" (success) or "<eval>:<named|between>";
# verdicts: (">" the first cell beats the second, or "~" within the margin; cell, cell, column, margin, the paper's numbers).
TABLES = {
    "table1": dict(
        title="Stage-2 signal x initialisation (the ETC paper's Table 1): success after stage 2, ETC accuracy",
        cells=dict(act_base=("action only, w/o DB", "s2_act_base", ()), act_db=("action only, w/ DB", "s2_act", ()),
                   etc_base=("+ETC, w/o DB", "s2_base", ()), etc_db=("+ETC, w/ DB", "s2", ())),
        evals=("source", "ood_source", "etc"), columns=("source", "ood_source", "ood_source:named", "etc"),
        verdicts=((">", "etc_db", "act_base", "source", 0, "VLABench T1 .648 vs .372; Simpler .844 vs .792"),
                  (">", "etc_db", "act_db", "etc", 0, "ETC retained with co-training, lost without (Fig. 4)"))),
    "stages": dict(
        title="Which stages use ETC (the ETC paper's stage ablation): success in-domain after stage 3",
        cells=dict(none=("none", "s3_none", ()), only2=("stage 2 only", "s3_only2", ()), only3=("stage 3 only", "s3_only3", ()),
                   both=("stages 2+3", "s3_both", ()), all3=("stages 1+2+3", "s3", ())),
        evals=("target",), columns=("target",),
        verdicts=((">", "both", "none", "target", 0, "WidowX 95.8 vs 66.7"),
                  (">", "both", "only2", "target", 0, "WidowX 95.8 vs 75.0"))),
    "ood": dict(
        title="Stage 3 with action data only / + in-domain ETC / + OOD ETC: novel colour words and phrasings",
        cells=dict(act=("action only", "s3_act", ()), id_etc=("+ in-domain ETC", "s3_id_etc", ()),
                   ood_etc=("+ OOD ETC", "s3", ())),
        evals=("target", "ood"), columns=("target", "ood", "ood:named"),
        verdicts=((">", "ood_etc", "act", "ood", 0.2, "CoffeeBag OOD .81 vs .42"),
                  ("~", "ood_etc", "act", "target", 0.05, "in-domain .92 vs .92"))),
    "etc_levels": dict(
        title="ETC categories in stage 2 (the ETC paper's category table): success in-domain after stage 2",
        cells=dict(act=("action only", "s2_act", ()), scene=("+ scene", "s2_scene", ()), task=("+ task", "s2_task", ()),
                   full=("full ETC (+ planning)", "s2", ())),
        evals=("source",), columns=("source",),
        verdicts=((">", "full", "act", "source", 0, "VLABench T1 .648 vs .443"),
                  (">", "scene", "act", "source", 0, "VLABench T1 .562 vs .443"))),
    "sdm": dict(
        title="One-step students of the stage-3 teacher, unimodal and ambiguous (two goals) layouts "
              "(latency per chunk: bench.py)",
        cells=dict(teacher10=("teacher, 10 steps", "s3", ()), teacher1=("teacher, 1 step", "s3", ("--steps", "1")),
                   sdm=("SDM, 1 step", "sdm", ()), cd=("CD, 1 step", "cd", ())),
        evals=("uni", "amb"), columns=("uni", "amb", "amb:between"),
        verdicts=((">", "sdm", "teacher1", "amb", 0.2, "one step at teacher quality (SDM)"),
                  ("~", "sdm", "teacher10", "amb", 0.05, "SDM within the teacher's range"),
                  (">", "sdm", "cd", "amb", 0, "SDM above CD"))),
}
# The binding benchmark (experiments/binding.py): learning curves of fresh VLMs, no datasets but the
# world probe's. cell -> its flags: the defaults, and the ablations that show what each default buys.
BINDING = dict(
    text=("--probe", "text"),  # places listed in the prompt, a blank image
    text_hf_init=("--probe", "text", "--embed-std", "0.02"),  # transformers' own embedding initialisation
    text_no_image=("--probe", "text", "--no-image"),  # the tiny language model alone
    # SmolLM2-135M pretrained (bash setup.sh --pretrained), alone: a short run at small batch and a fine-tuning lr
    text_smollm2=("--probe", "text", "--vlm", "smolvlm-256m-lm", "--no-image", "--batch", "8", "--lr", "1e-4",
                  "--warmup", "10", "--steps", "100", "--eval-every", "20"),
    discs=("--probe", "discs"),  # K flat discs
    discs_vision_lr01=("--probe", "discs", "--vision-lr", "0.1"),  # the vision tower at a tenth of the rate
    discs_vision_lr3=("--probe", "discs", "--vision-lr", "3"),  # and at three times it
    discs_one_first=("--probe", "discs", "--one-first", "1000"),  # a curriculum: one disc per image for 1,000 steps, then K
    world=("--probe", "world"),  # the grounded world's marker questions (data/scenes: 540 training layouts at 300 episodes)
    # three times the layouts: data/scenes_more is `data.py collect --out data/scenes_more --episodes 600 --seed 1`
    # with pipeline.sh's scenes flags, then `etc.py --data data/scenes_more` (1,620 training layouts)
    world_1620=("--probe", "world", "--data", "data/scenes", "data/scenes_more"),
    # data/scenes at pipeline.sh's 900 episodes (1,620 layouts) and data/scenes2, made as data/scenes_more with
    # --episodes 900 (3,240 layouts)
    world_3240=("--probe", "world", "--data", "data/scenes", "data/scenes2"),
    world_patch8=("--probe", "world", "--patch", "8"),  # 8 px patches: 64 image tokens (1,620 layouts at 900 episodes)
)
PARENT_FLAG = {"train_vla.py": "--init", "distill_sdm.py": "--teacher"}
DONE: set[Path] = set()  # runs trained in this sitting

@dataclass
class Config:
    table: tyro.conf.Positional[Literal[(*TABLES, "binding")]]  # which table to build, or the binding curves
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds
    eval_seeds: tuple[int, ...] = (0, 1)  # evaluation seeds: the same fixed layouts for every cell
    episodes: int = 10  # layouts per task and evaluation seed
    cells: tuple[str, ...] = ()  # () = every cell of the table
    steps: int | None = None  # every training run's steps (a quick or miniature table); default the run's
    etc_limit: int = 600  # ETC records asked per evaluation
    root: str = str(ROOT)  # where data/, runs/ and results/ are
    dry_run: bool = False  # print the commands, run nothing

def finished(out: Path) -> bool:  # a checkpoint whose run has done all of its steps
    try:
        p = json.loads((out / "config.json").read_text())["provenance"]
        return p["steps_done"] >= p["config"]["steps"]
    except (OSError, KeyError, ValueError):
        return False

def world_id() -> str:
    """The datasets hashed: meta.json (scene, seeds and proprio/action statistics, which move whenever
    the episodes do: a new expert, a new world) and etc.jsonl (the questions and answers: new ETC)."""
    h = hashlib.sha256()
    for d in ("source", "scenes", "target", "ood"):
        for f in ("meta.json", "etc.jsonl"):
            h.update(Path(f"data/{d}/{f}").read_bytes())
    return h.hexdigest()[:16]

def world_stamp(out: Path) -> Path:  # beside the run, not in it: the trainers own its folder
    return out.with_name(out.name + ".world")

def check_world(out: Path):
    """A checkpoint trained on other data than data/ holds now is not reused (nor resumed) silently."""
    stamp = world_stamp(out)
    if out.exists() and (not stamp.exists() or stamp.read_text() != world_id()):
        sys.exit(f"error: {out} was trained on other data than data/ holds now; "
                 f"delete it (or all of runs/) to retrain on the current data")

def call(cmd: list[str], cfg: Config):
    print("[experiments]", shlex.join(cmd), flush=True)
    if not cfg.dry_run:
        subprocess.run(cmd, check=True)

def train(cfg: Config, name: str, seed: int) -> Path:
    """The run's checkpoint, trained (after the runs it starts from) unless it is done."""
    script, parent, args = RUNS[name]
    # runs/s<seed>/<run>, shared by every table; a table at other steps (--steps) keeps its own copies
    out = Path("runs") / f"s{seed}" / (name if cfg.steps is None else f"{name}.steps{cfg.steps}")
    if out in DONE:
        return out
    check_world(out)
    if finished(out):  # its parents are not needed (nor retrained if deleted)
        return out
    DONE.add(out)  # a dry run lists each run once
    start = [] if parent is None else [PARENT_FLAG[script], parent if parent == "base" else str(train(cfg, parent, seed))]
    more = ["--resume"] if (out / "train_state.pt").exists() else []
    more += ["--eval-episodes", "0"] if script == "train_vla.py" else []
    if cfg.steps:  # one step count for every run, in place of the run's
        i = args.index("--steps") if "--steps" in args else len(args)
        args = [*args[:i], *args[i + 2:], "--steps", str(cfg.steps)]
    if not cfg.dry_run:
        out.parent.mkdir(parents=True, exist_ok=True)
        world_stamp(out).write_text(world_id())
    call([sys.executable, str(ROOT / script), *args, *start, *more, "--seed", str(seed), "--out", str(out)], cfg)
    return out

def evaluate(cfg: Config, cell: str, seed: int, ev: str):
    """results/<table>/<cell>.s<seed>.<ev>.json, with the cell, the training seed and the checkpoint's provenance."""
    label, run, extra = TABLES[cfg.table]["cells"][cell]
    results, name = Path("results") / cfg.table, f"{cell}.s{seed}.{ev}"
    if (results / f"{name}.json").exists():
        return
    ckpt = train(cfg, run, seed)
    args = ["--limit", str(cfg.etc_limit)] if ev == "etc" else [
        "--seeds", *map(str, cfg.eval_seeds), "--episodes", str(cfg.episodes), "--gifs", "0", *extra]
    # eval.py writes <name>.partial.json; the result counts as done once annotated under its own name
    call([sys.executable, str(ROOT / "eval.py"), *EVALS[ev], "--ckpt", str(ckpt), *args, "--name", f"{name}.partial",
          "--out", str(results)], cfg)
    if cfg.dry_run:
        return
    partial = results / f"{name}.partial.json"
    result = json.loads(partial.read_text())
    provenance = json.loads((ckpt / "config.json").read_text())["provenance"]
    result.update(name=name, table=cfg.table, cell=cell, label=label, eval=ev, train_seed=seed, provenance=provenance)
    (results / f"{name}.json").write_text(json.dumps(result, indent=1))
    partial.unlink()
    (results / f"{name}.partial.md").unlink(missing_ok=True)  # the table is built from the JSON

def binding(cfg: Config):
    """results/binding/<cell>.s<seed>.json for every cell and training seed, skipped when it exists."""
    unknown = set(cfg.cells) - set(BINDING)
    if unknown:
        sys.exit(f"error: no cell {sorted(unknown)} in binding; its cells are {list(BINDING)}")
    for seed in cfg.seeds:
        for cell in cfg.cells or BINDING:
            out = Path("results") / "binding" / f"{cell}.s{seed}.json"
            if not out.exists():
                steps = ["--steps", str(cfg.steps)] if cfg.steps else []
                call([sys.executable, str(ROOT / "experiments" / "binding.py"), *BINDING[cell], *steps, "--seed", str(seed),
                      "--threads", "2", "--out", str(out)], cfg)

def main(cfg: Config):
    os.chdir(cfg.root)
    if cfg.table == "binding":
        return binding(cfg)
    spec, t0 = TABLES[cfg.table], time.time()
    unknown = set(cfg.cells) - set(spec["cells"])
    if unknown:
        sys.exit(f"error: no cell {sorted(unknown)} in {cfg.table}; its cells are {list(spec['cells'])}")
    needed = [f"data/{d}/etc.jsonl" for d in ("source", "scenes", "target", "ood")]
    if not all(map(os.path.exists, needed)):
        if Path(cfg.root).resolve() != ROOT:
            sys.exit(f"error: {cfg.root} lacks {needed}; make them with `bash pipeline.sh data` and copy data/ there")
        call(["bash", str(ROOT / "pipeline.sh"), "data"], cfg)
    results = Path("results") / cfg.table
    table = {k: spec[k] for k in ("title", "columns", "verdicts")}
    table["cells"] = {c: label for c, (label, _, _) in spec["cells"].items()}
    path = results / "table.json"
    before = json.loads(path.read_text()).get("wall_s", 0) if path.exists() else 0  # earlier sittings

    def save():  # the table's layout for report.py, and its wall-clock over every sitting
        if not cfg.dry_run:
            results.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(dict(table, wall_s=before + time.time() - t0, config=asdict(cfg)), indent=1))
    save()
    for seed in cfg.seeds:
        for cell in cfg.cells or spec["cells"]:
            for ev in spec["evals"]:
                evaluate(cfg, cell, seed, ev)
                save()
    print(f"[experiments] {cfg.table}: {time.time() - t0:.0f} s this sitting, {before + time.time() - t0:.0f} s in all")

if __name__ == "__main__":
    main(tyro.cli(Config))
