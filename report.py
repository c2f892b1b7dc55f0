"""Results -> tables: 95% bootstrap intervals, verdicts against the papers, the README's results.

    python report.py                           # print the tables: out/eval/*.json, out/bench.md, results/<table>/
    python report.py --readme README.md        # and write them between the README's two marker lines

Reads what eval.py (out/eval/<name>.json), bench.py (out/bench.md) and experiments/run.py
(results/<table>/: one JSON per cell, training seed and evaluation) wrote; runs nothing.
"""
import ast, json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import data, etc, sim


@dataclass
class Report:
    """The results tables (markdown) from out/eval/*.json and bench.py's out/bench.md."""
    results: str = "out/eval"
    bench: str = "out/bench.md"
    tables: str = "results"  # experiment tables: every <tables>/<table>/table.json (experiments/run.py); bench runs in <tables>/real/
    readme: str | None = None  # write the experiment tables and the file map between this file's two marker lines
    doc: str | None = None  # write the pipeline run's results and speed between this file's marker lines (docs/results.md)

# --- Experiment tables: means over training seeds, 95% bootstrap intervals, verdicts -----------
def strata(result: dict, metric: str) -> list[np.ndarray]:
    """A result's 0/1 outcomes for a metric, per stratum: per task (success, named, between) or
    per ETC level (rebuilt from its exact counts, acc = k / n)."""
    if result["kind"] == "etc":
        return [np.repeat([1.0, 0.0], [round(s["acc"] * s["n"]), s["n"] - round(s["acc"] * s["n"])])
                for s in result["scores"].values()]
    tasks = {}
    for e in result["episodes"]:
        tasks.setdefault(e["task"], []).extend(x for x in e[metric] if x is not None)
    return [np.array(v, float) for v in tasks.values() if v]

def resampled(seeds: list[list[np.ndarray]], rng: np.random.Generator, reps: int) -> np.ndarray:
    """(seeds, reps): each seed's pooled rate with its outcomes resampled within their strata."""
    out = np.zeros((len(seeds), reps))
    for i, strata_ in enumerate(seeds):
        n = sum(len(s) for s in strata_)
        out[i] = sum(s[rng.integers(len(s), size=(reps, len(s)))].sum(1) for s in strata_) / n
    return out

def bootstrap(a: list[list[np.ndarray]], b: list[list[np.ndarray]] | None = None, reps: int = 4000,
              seed: int = 0) -> tuple[float, float, float]:
    """Mean over training seeds of the pooled outcome rate and its 95% percentile interval, from a
    two-level bootstrap: resample the seeds, then each seed's outcomes within strata (tasks). With
    b, the difference a - b, seeds paired (a[i] and b[i] share training seed i)."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(len(a), size=(reps, len(a)))  # (reps, seeds): the same seed draw for a and b
    stat = lambda x: resampled(x, rng, reps)[pick, np.arange(reps)[:, None]].mean(1)  # noqa: E731
    point = lambda x: float(np.mean([np.concatenate(s).mean() for s in x]))  # noqa: E731
    draws, mean = (stat(a), point(a)) if b is None else (stat(a) - stat(b), point(a) - point(b))
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return mean, float(lo), float(hi)

def verdict(kind: str, diff: tuple[float, float, float], margin: float) -> str:
    """'>': the interval of the difference above 0; '~': inside +-margin."""
    mean, lo, hi = diff
    if kind == "~":
        return "reproduced" if -margin <= lo and hi <= margin else "not shown (the interval leaves +-%.2f)" % margin
    status = "reproduced" if lo > 0 else "reversed" if hi < 0 else "not shown (the interval holds 0)"
    return status + (f"; target +{margin:.2f} {'met' if mean >= margin else 'not met'}" if margin else "")

HEADS = dict(source="in-domain (source scene)", target="in-domain (target scene)", ood="novel colour words",
             ood_source="novel colour words (source scene)",
             uni="one goal", amb="two goals (ambiguous)", etc="ETC accuracy", named="at the named marker", between="between goals")

def table_markdown(folder: Path) -> list[str]:
    spec, found = json.loads((folder / "table.json").read_text()), {}
    for p in folder.glob("*.s*.*.json"):
        if p.name.endswith(".partial.json"):  # an evaluation cut off before experiments/run.py annotated it
            continue
        r = json.loads(p.read_text())
        found.setdefault((r["cell"], r["eval"]), {})[r["train_seed"]] = r
    def cell(c: str, column: str, seeds=None) -> list[list[np.ndarray]]:  # per training seed, in seed order
        ev, _, metric = column.partition(":")
        return [strata(r, metric or "success") for s, r in sorted(found.get((c, ev), {}).items()) if seeds is None or s in seeds]
    seeds_of = lambda c, col: set(found.get((c, col.split(":")[0]), {}))  # noqa: E731
    fmt = lambda m, lo, hi: f"{m:.2f} [{lo:.2f}, {hi:.2f}]"  # noqa: E731
    cols = spec["columns"]
    heads = [HEADS[c.split(":")[0]] + (f", {HEADS[c.split(':')[1]]}" if ":" in c else "") for c in cols]
    out = [f"**{folder.name}**: {spec['title']}. Mean over training seeds [95% interval, two-level bootstrap over "
           "seeds and episodes].", "", "| cell | " + " | ".join(heads) + " | training seeds |", "|---" * (len(cols) + 2) + "|"]
    for c, label in spec["cells"].items():
        seeds = sorted({s for (cc, _), v in found.items() if cc == c for s in v})
        out.append(f"| {label} | " + " | ".join(fmt(*bootstrap(x)) if (x := cell(c, col)) else "" for col in cols)
                   + f" | {len(seeds)} |")
    eps = sorted({row["episodes"] for v in found.values() for r in v.values() if r["kind"] == "success" for row in r["rows"]})
    out += ["", f"Episodes per task, cell and training seed: {', '.join(map(str, eps))}; wall-clock on this machine "
            f"so far: {spec.get('wall_s', 0) / 3600:.1f} h (`python experiments/run.py {folder.name}`).", ""]
    for kind, a, b, col, margin, paper in spec["verdicts"]:
        both = seeds_of(a, col) & seeds_of(b, col)  # paired by training seed
        said = (f"{(d := bootstrap(cell(a, col, both), cell(b, col, both)))[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}] over "
                f"{len(both)} seed(s): {verdict(kind, d, margin)}") if both else "no results yet"
        out.append(f"- {spec['cells'][a]} {'>' if kind == '>' else '~'} {spec['cells'][b]} ({HEADS[col.split(':')[0]]}): "
                   f"{said}; the paper: {paper}")
    return out + [""]

# --- The results section of the README --------------------------------------------------------
MARK = ("<!-- results: generated by `python report.py --readme README.md` -->", "<!-- end of results -->")

def grounding_markdown(r: dict) -> list[str]:
    """eval.py grounding's rate of heading for the named marker, per task and for the novel words,
    with a 95% interval from a bootstrap over layouts (a layout's rows share one image)."""
    def rate(rows: list[dict], key: str = "hit") -> str:
        by_seed = {}  # a layout's rows share its seed
        for x in rows:
            by_seed.setdefault(x["seed"], []).append(x[key])
        per_layout = np.array([np.mean(v) for v in by_seed.values()])
        return "{:.2f} [{:.2f}, {:.2f}]".format(*bootstrap([[per_layout]]))
    c, novel = r["config"], {sim.parse_color(g)[0] for g in r["config"]["goal_colors"] or ()}
    cells = []
    for t, rows in r["rows"].items():
        if not rows:  # push: the expert's first chunk goes to the puck whichever marker is named
            cells.append(f"{t} n/a (the expert's first chunk is the same toward every marker)")
            continue
        pull = r["summary"][t]["novel_when_other_named"]
        cells.append(f"{t} {rate(rows)}" + (f" (novel words {rate([x for x in rows if x['word'] in novel])}; drawn to "
                                          f"the novel marker when another is named {pull:.2f})" if novel else "")
                     + (f"; the VLM's own answer to \"where is the goal of <instruction>?\" at the named marker "
                        f"{rate(rows, 'vlm_hit')}" if "vlm_hit" in rows[0] else ""))
    return [f"**Grounding probe** (`eval.py grounding`), {r['ckpt']}: how often the first chunk heads for the named "
            f"marker ({c['layouts']} layouts per task, each marker named in turn, {c['draws']} draws from shared noise; "
            f"chance {next(iter(r['summary'].values()))['chance']:.2f}; 95% intervals over layouts): " + ", ".join(cells), ""]

def run_markdown(cfg: Report) -> list[str]:
    """One pipeline run: closed-loop success, ETC accuracy, grounding, CKA (out/eval/*.json) and speed."""
    res = [json.loads(p.read_text()) for p in sorted(Path(cfg.results).glob("*.json"))]
    out = []
    succ = [r for r in res if r["kind"] == "success"]
    if succ:
        tasks = sorted({row["task"] for r in succ for row in r["rows"]})
        out += ["**Closed-loop success** (Meta-World success at any step, at either goal of the named colour; mean "
                "+- std over evaluation seeds). With markers, a task's cell adds the rate of ending at the named "
                "marker and, for ambiguous layouts, between the two goals: success / named / between.", "",
                "| run | checkpoint | steps/chunk | condition | " + " | ".join(tasks) + " | mean |",
                "|---" * (5 + len(tasks)) + "|"]
        rates = lambda row: "".join(f" / {row[k]:.2f}" for k in ("named", "between") if row.get(k) is not None)  # noqa: E731
        for r in succ:
            for cond, o in r["overall"].items():
                cell = {row["task"]: f"{row['mean']:.2f}" + rates(row) for row in r["rows"] if row["condition"] == cond}
                out.append(f"| {r['name']} | {r['ckpt']} | {r['steps']} | {cond} | "
                           + " | ".join(cell.get(t, "") for t in tasks) + f" | **{o['mean']:.2f} +- {o['std']:.2f}** |")
        eps = sorted({row["episodes"] for r in succ for row in r["rows"]})
        out += ["", f"Episodes per task and condition: {', '.join(map(str, eps))}.", ""]
    etcs = [r for r in res if r["kind"] == "etc"]
    if etcs:
        px = lambda e: f" ({e:.1f} px)" if e <= 200 else " (> 200 px: off the image)"  # a model that writes runaway digits  # noqa: E731
        cell = lambda s: f"{s['acc']:.2f}" + (px(s["px_err"]) if s.get("px_err") is not None else "")  # noqa: E731
        out += ["**ETC question accuracy** on held-out episodes: words exact, points within 4 px "
                "(median pixel error of the coordinate answers)", "",
                "| checkpoint | " + " | ".join(etc.LEVELS) + " | records |", "|---" * (len(etc.LEVELS) + 2) + "|"]
        out += [f"| {r['ckpt']} | " + " | ".join(cell(r["scores"][lv]) if lv in r["scores"] else "" for lv in etc.LEVELS)
                + f" | {r['records']} |" for r in etcs]
        kinds = sorted({k for r in etcs for k in r.get("kinds", {})})
        if kinds:  # the same answers per question kind (marker, goal, nearest: the grounded world's)
            out += ["", "| checkpoint | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
            out += [f"| {r['ckpt']} | " + " | ".join(cell(r["kinds"][k]) if k in r.get("kinds", {}) else "" for k in kinds)
                    + " |" for r in etcs]
        out.append("")
    for r in (r for r in res if r["kind"] == "grounding"):
        out += grounding_markdown(r)
    for r in (r for r in res if r["kind"] == "cka"):
        out += [f"**Representation drift**, linear CKA per VLM layer (embeddings first), {r['a']} vs {r['b']}, "
                f"{r['frames']} held-out frames: " + ", ".join(f"{v:.3f}" for v in r["layers"]), ""]
    bench = Path(cfg.bench)
    if bench.is_file():
        out += ["**Speed** (`python bench.py`)", "", bench.read_text().strip(), ""]
    for f in sorted(Path(cfg.tables).glob("real/bench_*.md")):  # bench.py runs kept beside the tables (each names its command)
        out += [f"**Speed: {f.stem.removeprefix('bench_').replace('_', ', ')}** (`{f}`)", "", f.read_text().strip(), ""]
    return out

def file_map() -> list[str]:
    """Every top-level file and experiment script: its lines and its docstring's first line."""
    root = Path(__file__).resolve().parent
    files = {p.name: p.read_text() for p in sorted(root.glob("*.py"))}  # concept: the docstring's first line
    tests = sum(len(p.read_text().splitlines()) for p in (root / "tests").glob("*.py"))
    files |= {f"experiments/{p.name}": p.read_text() for p in sorted((root / "experiments").glob("*.py"))}
    out = ["**File map**", "", "| file | lines | concept |", "|---|---|---|"]
    out += [f"| `{f}` | {len(t.splitlines())} | {ast.get_docstring(ast.parse(t)).splitlines()[0]} |" for f, t in files.items()]
    return out + [f"| `tests/` | {tests} | pytest |",
                  f"| core total (top level) | {sum(len(t.splitlines()) for f, t in files.items() if '/' not in f)} | |", ""]

def tables_markdown(cfg: Report) -> list[str]:
    return [line for folder in sorted(p.parent for p in Path(cfg.tables).glob("*/table.json")) for line in table_markdown(folder)]

def report_markdown(cfg: Report) -> str:
    return "\n".join(run_markdown(cfg) + tables_markdown(cfg) + file_map()) + "\n"
def marked(path: Path) -> tuple[str, str]:
    """The file's text before its first marker line and from its second on (MARK)."""
    text = path.read_text()
    if MARK[0] not in text or MARK[1] not in text:
        raise data.DataError(f"{path} has no generated section; add the two marker lines {MARK} where it goes")
    head, rest = text.split(MARK[0], 1)
    return head + MARK[0] + "\n", rest[rest.index(MARK[1]):]

def report(cfg: Report) -> str:
    """Print every table; write the experiment tables and file map into --readme, the run into --doc."""
    run, rest = run_markdown(cfg), tables_markdown(cfg) + file_map()
    targets = [(Path(f), "\n".join(md) + "\n") for f, md in ((cfg.readme, rest), (cfg.doc, run)) if f]
    kept = [marked(path) for path, _ in targets]  # every file checked before any is written
    for (path, md), (head, tail) in zip(targets, kept):
        path.write_text(head + md + tail)
    md = "\n".join(run + rest) + "\n"
    print(md)
    return md


if __name__ == "__main__":
    data.cli(report, Report)
