"""experiments/run.py end to end on a miniature grounded world, and the interval code on known cases."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import report as E

ROOT = Path(__file__).resolve().parents[1]


def test_bootstrap_interval_on_known_cases():
    # One training seed, 200 of 400 episodes: the binomial interval 0.5 +- 1.96 * 0.025.
    mean, lo, hi = E.bootstrap([[np.r_[np.ones(200), np.zeros(200)]]])
    assert mean == 0.5 and abs(lo - 0.451) < 0.01 and abs(hi - 0.549) < 0.01
    # Three seeds at 0, 0 and 1: resampled seeds give 0 with chance 8/27 and 1 with 1/27 (> 2.5% each).
    assert E.bootstrap([[np.zeros(20)], [np.zeros(20)], [np.ones(20)]]) == (pytest.approx(1 / 3), 0.0, 1.0)
    # Differences pair the seeds: a seed at 1 and one at 0 in both cells cancel (unpaired they would not).
    by_seed = [[np.ones(10)], [np.zeros(10)]]
    assert E.bootstrap(by_seed, by_seed) == (0.0, 0.0, 0.0)
    assert E.bootstrap([[np.ones(10)]] * 2, [[np.zeros(10)]] * 2) == (1.0, 1.0, 1.0)
    assert E.verdict(">", (0.3, 0.1, 0.5), 0.2).startswith("reproduced; target +0.20 met")
    assert E.verdict(">", (0.1, -0.1, 0.3), 0).startswith("not shown")
    assert E.verdict("~", (0.01, -0.03, 0.04), 0.05) == "reproduced"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """data/source, data/scenes, data/target and data/ood of the grounded world: reach and push, 3 markers."""
    import data
    import etc
    import sim
    root = tmp_path_factory.mktemp("exp")
    look = dict(markers=3, object_color="black")
    for name, kw in [("source", {}), ("scenes", {}), ("target", dict(table_color="white")),
                     ("ood", dict(table_color="white", goal_colors=("teal=0,0.5,0.5", "lime=0.6,1,0.2")))]:
        out = root / "data" / name
        data.collect(data.Collect(tasks=("reach", "push"), episodes=2, out=str(out), workers=1, actions=name not in ("scenes", "ood"),
                                  variation=sim.Variation(**look, **kw)))
        etc.write(etc.Etc(data=str(out), paraphrases="heldout" if name == "ood" else "train"))
    return root


def run(world, *args) -> str:
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), "ood", "--root", str(world), "--seeds", "0",
           "--cells", "act", "ood_etc", "--steps", "2", "--episodes", "1", "--eval-seeds", "0", *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return "\n".join(line for line in out.splitlines() if line.startswith("[experiments]"))  # the commands run


def test_a_miniature_table_runs_resumes_and_reports_with_intervals(world):
    first = run(world)
    assert first.count("train_vla.py") == 3 and first.count("eval.py") == 4  # s2 shared by both cells
    results = world / "results" / "ood"
    names = sorted(p.name for p in results.glob("*.json"))
    assert names == ["act.s0.ood.json", "act.s0.target.json", "ood_etc.s0.ood.json", "ood_etc.s0.target.json", "table.json"]
    r = json.loads((results / "ood_etc.s0.ood.json").read_text())
    assert r["cell"] == "ood_etc" and r["train_seed"] == 0 and r["provenance"]["seed"] == 0
    assert {e["task"] for e in r["episodes"]} == {"reach", "push"}
    again = run(world)  # everything is done: nothing trains or evaluates
    assert "train_vla.py" not in again and "eval.py" not in again
    # Another table reuses the runs it shares with this one (stage 1 and stage 2) and trains only its own.
    plan = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), "table1", "--root", str(world), "--seeds", "0",
                           "--steps", "2", "--dry-run"], check=True, capture_output=True, text=True).stdout
    trained = sorted(line.split("--out ")[1] for line in plan.splitlines() if "train_" in line)
    assert trained == [f"runs/s0/{r}.steps2" for r in ("s2_act", "s2_act_base", "s2_base")]
    # A run trained on other data than data/ holds now is refused, with the fix, not reused.
    stamp = world / "runs" / "s0" / "s2.steps2.world"
    stamp.write_text("another world")
    p = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), "table1", "--root", str(world), "--seeds", "0",
                        "--steps", "2", "--dry-run"], capture_output=True, text=True)
    assert p.returncode != 0 and "runs/s0/s2.steps2 was trained on other data than data/ holds now; delete it" in p.stderr
    md = "\n".join(E.table_markdown(results))
    assert "| + in-domain ETC |  |  |  | 0 |" in md  # a cell not run yet: an empty row
    assert "+ OOD ETC > action only (novel colour words): " in md and "over 1 seed(s)" in md
    row = next(line for line in md.splitlines() if line.startswith("| + OOD ETC"))
    assert row.count("[") == 3 and row.endswith("| 1 |")


def test_an_unknown_cell_is_named_with_the_valid_ones(world):
    p = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), "sdm", "--root", str(world), "--cells", "sdm2"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "no cell ['sdm2'] in sdm; its cells are ['teacher10', 'teacher1', 'sdm', 'cd']" in p.stderr


def test_the_world_stamp_moves_with_the_data_and_its_etc_records(tmp_path, monkeypatch):
    import importlib.util
    spec = importlib.util.spec_from_file_location("run", ROOT / "experiments" / "run.py")
    R = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(R)
    for d in ("source", "scenes", "target", "ood"):
        (tmp_path / "data" / d).mkdir(parents=True)
        (tmp_path / "data" / d / "meta.json").write_text("{}")
        (tmp_path / "data" / d / "etc.jsonl").write_text('{"q": 1}\n')
    monkeypatch.chdir(tmp_path)
    before = R.world_id()
    (tmp_path / "data" / "scenes" / "etc.jsonl").write_text('{"q": 2}\n')  # new ETC on the same episodes
    after = R.world_id()
    (tmp_path / "data" / "target" / "meta.json").write_text('{"expert": "new"}')  # new episodes
    assert len({before, after, R.world_id()}) == 3


@pytest.mark.parametrize("probe", ["text", "discs", "world"])
def test_the_binding_benchmark_writes_a_curve_for_each_probe(world, tmp_path, probe):
    """A miniature of each probe: two steps, one evaluation on held-out samples, the curve on disk."""
    out = tmp_path / f"{probe}.json"
    subprocess.run([sys.executable, str(ROOT / "experiments" / "binding.py"), "--probe", probe, "--steps", "2", "--batch", "4",
                    "--held", "6", "--data", str(world / "data" / "scenes"), "--holdout", "2", "--out", str(out)],
                   check=True, capture_output=True, text=True)
    r = json.loads(out.read_text())
    assert r["probe"] == probe and r["config"]["steps"] == 2 and [p["step"] for p in r["curve"]] == [0, 2]
    point = r["curve"][1]
    assert probe != "world" or (r["layouts"]["train"] > 0 and r["layouts"]["held"] > 0)  # what the curve generalises from
    assert point["step"] == 2 and point["chance"] == pytest.approx(1 / 3) and 0 <= point["named"] <= 1 and point["loss"] > 0


def test_the_binding_plan_skips_curves_already_written(world):
    def plan():
        out = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), "binding", "--root", str(world), "--seeds", "0",
                              "--dry-run"], check=True, capture_output=True, text=True).stdout
        return [line.split("--out ")[1] for line in out.splitlines() if "binding.py" in line]
    assert plan() == [f"results/binding/{cell}.s0.json" for cell in ("text", "text_hf_init", "text_no_image", "text_smollm2",
                                                                      "discs", "discs_vision_lr01", "discs_vision_lr3", "discs_one_first",
                                                                      "world", "world_1620", "world_3240", "world_patch8")]
    (world / "results" / "binding").mkdir(parents=True)
    (world / "results" / "binding" / "discs.s0.json").write_text("{}")
    assert "results/binding/discs.s0.json" not in plan()


def test_binding_scores_an_answer_by_its_nearest_place():
    import importlib.util
    spec = importlib.util.spec_from_file_location("binding", ROOT / "experiments" / "binding.py")
    B = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(B)
    places = np.array([[10, 10], [40, 40], [10, 50]])
    held = [({}, places, 1)] * 4
    # the asked place exactly; 5 px off it (named, not within 4 px); nearest another place; no point at all
    assert B.score(["40 40", "43 44", "12 12", "yes"], held) == (0.5, 0.25)
