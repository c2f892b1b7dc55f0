"""eval.py: success counting, the JSON/markdown writers, CKA, rollouts under any colour and text, the grounding probe."""
import json

import numpy as np
import pytest
import torch

import data
import eval as ev
import model
import report
import scaffold


def test_success_is_counted_per_seed_and_summarised_over_seeds():
    ok = lambda *s: [(bool(x), None, None) for x in s]  # noqa: E731  (no markers: no named marker)
    outcomes = {("reach", "default", 0): ok(1, 1, 0, 0), ("reach", "default", 1): ok(1, 1, 1, 1),
                ("push", "default", 0): ok(0, 0, 0, 0), ("push", "default", 1): ok(1, 0, 0, 0),
                ("push", "markers 3", 0): [(True, True, None), (False, True, True), (False, False, False), (False, False, None)]}
    s = ev.summarise(outcomes)
    reach = next(r for r in s["rows"] if r["task"] == "reach")
    assert reach["per_seed"] == [0.5, 1.0] and reach["mean"] == 0.75 and reach["std"] == 0.25 and reach["episodes"] == 8
    assert reach["named"] is None and next(r for r in s["rows"] if r["condition"] == "markers 3")["named"] == 0.5
    # over tasks, per seed: seed 0 (0.5 + 0) / 2, seed 1 (1 + 0.25) / 2 -> mean 0.4375, std 0.1875
    assert s["overall"]["default"] == dict(mean=0.4375, std=0.1875)
    md = ev.success_markdown(s, "title")
    assert "| reach | default | 0.75 +- 0.25 |  |  | 8 |" in md and "| push | markers 3 | 0.25 +- 0.00 | 0.50 | 0.50 | 4 |" in md
    assert "**0.44 +- 0.19**" in md


def test_cka_is_one_for_itself_and_rotations_and_near_zero_for_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=g) @ torch.randn(16, 16, generator=g)  # correlated features
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert ev.linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)
    assert ev.linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0, abs=1e-9)  # rotation, scale and shift
    assert ev.linear_cka(x, torch.randn(2000, 16, generator=g)) < 0.05


def test_rollouts_accept_any_colour_and_instruction_and_write_results(dataset_path, etc_path, tmp_path):
    torch.manual_seed(0)
    vla = model.VLA(model.VLAConfig(), stats=data.Dataset(dataset_path).meta["stats"])
    vla.save(tmp_path / "policy")
    cfg = ev.Success(ckpt=str(tmp_path / "policy"), data=str(dataset_path), tasks=("reach",),
                     object_colors=("0,128,255",), table_colors=("white", "purple"), instruction="touch the cyan dot",
                     seeds=(0, 1), episodes=1, max_steps=16, workers=1, out=str(tmp_path / "eval"), name="run")
    result = ev.success(cfg)
    assert result["instructions"] == {"reach": ["touch the cyan dot"]} and result["steps"] == 10
    assert {r["condition"] for r in result["rows"]} == {"object 0,128,255, table white", "object 0,128,255, table purple"}
    assert all(r["episodes"] == 2 and len(r["per_seed"]) == 2 for r in result["rows"])
    assert json.loads((tmp_path / "eval" / "run.json").read_text())["rows"] == result["rows"]
    assert (tmp_path / "eval" / "run.md").read_text().count("| reach |") == 2
    assert len(list((tmp_path / "eval").glob("*.gif"))) == 2  # one per condition, from the first seed

    scores = ev.etc_accuracy(ev.EtcAccuracy(ckpt=str(tmp_path / "policy"), data=(str(etc_path),), holdout=2, limit=12, out=str(tmp_path / "eval")))
    assert scores["records"] == 12 and set(scores["scores"]) <= {"scene", "task", "planning"}
    readme, doc = tmp_path / "README.md", tmp_path / "results.md"
    for f in (readme, doc):
        f.write_text(f"intro\n{report.MARK[0]}\nthe previous results\n{report.MARK[1]}\noutro\n")
    report.report(report.Report(results=str(tmp_path / "eval"), bench=str(tmp_path / "none.md"), readme=str(readme), doc=str(doc)))
    text, run = readme.read_text(), doc.read_text()
    for t in (text, run):
        assert t.startswith("intro\n") and t.endswith(f"{report.MARK[1]}\noutro\n") and "the previous results" not in t
    assert "| run | " in run and "| scene | task | planning |" in run and "| run | " not in text  # success, ETC: the run's page
    assert "| `eval.py` |" in text and "| `experiments/binding.py` |" in text  # the file map: the README


@pytest.mark.parametrize("mode", ["right", "wrong", "empty"])
def test_grounded_rollouts_name_a_marker_and_report_where_the_episode_ended(mode, tmp_path):
    ds = data.collect(data.Collect(tasks=("reach",), episodes=1, out=str(tmp_path / "ds"), workers=1,
                                   variation=data.sim.Variation(markers=3)))
    torch.manual_seed(0)
    model.VLA(model.VLAConfig(), stats=data.Dataset(ds).meta["stats"]).save(tmp_path / "policy")
    result = ev.success(ev.Success(ckpt=str(tmp_path / "policy"), data=str(ds), mode=mode, goal_colors=("teal=0,0.5,0.5",),
                                   seeds=(0,), episodes=3, max_steps=8, workers=1, gifs=0, out=str(tmp_path / "eval")))
    texts, (row,) = result["instructions"]["reach"], result["rows"]
    assert row["condition"] == "markers 3, goal teal=0,0.5,0.5" and row["named"] is not None
    assert len(result["episodes"][0]["named"]) == 3
    if mode == "empty":
        assert texts == [""]
    else:  # the goal is teal, so only 'wrong' names another colour
        assert all(("teal" in t) == (mode == "right") and "marker" in t for t in texts), texts


def test_an_episodes_policy_noise_is_seeded_by_its_layout_and_the_callers_generator_is_left_alone():
    """eval.py's workers take jobs in no fixed order: an episode must not depend on the torch
    generator's state before it (it did: the same checkpoint scored 0.30 and 0.50 on reach)."""
    noisy = lambda image, text, proprio: torch.rand(8, 4).numpy() * 2 - 1  # noqa: E731  a policy that is all noise
    runs = []
    for before in (1, 2):
        torch.manual_seed(before)
        frames = []
        outcome = scaffold.run_policy(noisy, "reach", [3, 4], "reach the goal", max_steps=16, frames=frames)
        runs.append((outcome, np.stack([ep[-1] for ep in frames]), torch.rand(3)))
    (a, last_a, after_a), (b, last_b, _) = runs
    assert a == b and np.array_equal(last_a, last_b)  # the same episodes from either generator state
    assert not np.array_equal(last_a[0], last_a[1])  # and the frames do show the two layouts
    torch.manual_seed(1)
    assert torch.equal(after_a, torch.rand(3))  # the caller's generator as if no episode had run


def test_grounding_probe_scores_a_word_reading_policy_at_one_and_a_blind_one_at_chance():
    """The probe's reference is the scripted expert's first chunk toward each marker. A policy that heads where
    the word says hits every time; one that ignores the word (always the first marker's chunk) hits 1/K."""
    var, layouts = data.sim.Variation(markers=3), data.eval_seeds("reach", 0, 4)
    ref, calls = data.sim.World("reach", variation=var), iter(layouts * 2)  # the probe asks once per layout, in order

    def expert_chunk(seed: int, j: int) -> np.ndarray:  # (8, 4): the expert's first actions toward marker j
        ref.seed(seed, goal=j)
        actions = []
        for _ in range(8):
            actions.append(ref.expert_action())
            ref.step(actions[-1])
        return np.stack(actions)

    def named(seed: int, text: str) -> int:  # the marker whose colour word the text says
        ref.seed(seed)
        return next(j for j, w in enumerate(ref.marker_words) if f" {w} " in text)

    def oracle(image, texts, proprio):  # (K, 1, 8, 4): heads where each text's word says
        seed = now[0] = next(calls)
        return np.stack([[expert_chunk(seed, named(seed, t))] for t in texts])

    def knows(samples):  # a VLM that answers the goal question with the named marker's pixel
        ref.seed(now[0])
        return [" ".join(str(round(x)) for x in ref.project(ref.markers)[named(now[0], s["text"])]) for s in samples]
    now = [None]

    def blind(image, texts, proprio):  # the first marker's chunk whatever the word
        return np.stack([[expert_chunk(next(calls), 0)]] * len(texts))
    try:
        reading = scaffold.grounding_probe(oracle, "reach", layouts, var, ask=knows)
        ignoring = scaffold.grounding_probe(blind, "reach", layouts, var, ask=lambda samples: ["no idea"] * len(samples))
    finally:
        ref.close()
    assert [r["hit"] for r in reading] == [1.0] * 12 and [r["hit"] for r in ignoring] == [1.0, 0.0, 0.0] * 4
    assert [r["vlm"] for r in reading] == [0, 1, 2] * 4 and [r["vlm_hit"] for r in reading] == [1.0] * 12
    assert {r["vlm"] for r in ignoring} == {-1} and {r["vlm_hit"] for r in ignoring} == {0.0}  # no point: a miss
    # push: the expert first goes to the puck whichever marker is named, so no layout can score (not a tie -> marker 0)
    assert scaffold.grounding_probe(lambda *a: pytest.fail("asked"), "push", data.eval_seeds("push", 0, 2), var) == []


def test_the_pull_of_a_novel_colour_counts_draws_toward_it_when_another_word_is_named():
    words = [dict(word="teal", nearest=[0, 0]), dict(word="blue", nearest=[0, 0]), dict(word="green", nearest=[0, 2])]
    layout = [dict(r, seed=0) for r in words]
    assert ev.pulled(layout, {"teal"}) == 3 / 4  # teal is marker 0: 3 of the other words' 4 draws head there
    second = [dict(r, seed=1) for r in words[1:] + words[:1]]
    assert ev.pulled(layout + second, {"teal"}) == 4 / 8  # teal last in layout 2: 1 of 4 there
    assert ev.pulled(layout, set()) is None


def test_grounding_command_writes_rates_per_task_and_word_the_report_shows_them_and_needs_markers(dataset_path, tmp_path):
    ds = data.collect(data.Collect(tasks=("reach",), episodes=1, out=str(tmp_path / "ds"), workers=1,
                                   variation=data.sim.Variation(markers=3)))
    torch.manual_seed(0)
    model.VLA(model.VLAConfig(), stats=data.Dataset(ds).meta["stats"]).save(tmp_path / "policy")
    cfg = ev.Grounding(ckpt=str(tmp_path / "policy"), data=str(ds), tasks=("reach",), goal_colors=("teal=0,0.5,0.5",),
                       layouts=3, draws=2, steps=2, out=str(tmp_path / "eval"))
    result = ev.grounding(cfg)
    rows, s = result["rows"]["reach"], result["summary"]["reach"]
    assert len(rows) == 9 and all(len(r["nearest"]) == 2 for r in rows) and s["chance"] == 1 / 3
    assert s["novel"] == np.mean([r["hit"] for r in rows if r["word"] == "teal"]) == s["named_by_word"]["teal"]
    assert json.loads((tmp_path / "eval" / "grounding_policy.json").read_text())["summary"] == result["summary"]
    md = report.report_markdown(report.Report(results=cfg.out, bench=str(tmp_path / "none.md"), tables=str(tmp_path / "none")))
    line = next(ln for ln in md.splitlines() if ln.startswith("**Grounding probe**"))  # the report shows the rates
    assert f"reach {s['named']:.2f} [" in line and f"(novel words {s['novel']:.2f} [" in line and "chance 0.33" in line
    assert s["vlm_named"] == np.mean([r["vlm_hit"] for r in rows]) and f"at the named marker {s['vlm_named']:.2f} [" in line
    with pytest.raises(data.DataError, match="--variation.markers 3"):  # a dataset without markers: the fix named
        ev.grounding(ev.Grounding(ckpt=cfg.ckpt, data=str(dataset_path), out=cfg.out))


def test_bad_input_stops_clearly(dataset_path, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown colour 'bleu'"):
        ev.success(ev.Success(ckpt=str(tmp_path / "none"), data=str(dataset_path), object_colors=("bleu",)))
    with pytest.raises(model.CheckpointError, match="no checkpoint"):
        ev.etc_accuracy(ev.EtcAccuracy(ckpt=str(tmp_path / "none")))
    readme, doc = tmp_path / "README.md", tmp_path / "results.md"
    readme.write_text("no markers\n")
    doc.write_text(f"{report.MARK[0]}\nkept\n{report.MARK[1]}\n")
    with pytest.raises(ValueError, match="marker"):  # nothing written, not even the file that has its markers
        report.report(report.Report(results=str(tmp_path), readme=str(readme), doc=str(doc)))
    assert readme.read_text() == "no markers\n" and "kept" in doc.read_text()


def test_bench_quick_mode_prints_every_table(tmp_path):
    import bench
    out = tmp_path / "bench.md"
    bench.main(bench.Bench(quick=True, sizes=(64,), workers=(1,), teacher=str(tmp_path / "none"), students=(), out=str(out)))
    text = out.read_text()
    for title in ("Collection", "PI0ForConditionalGeneration", "model FLOP utilisation", "Inference latency"):
        assert title in text
    assert float(text.split("write the goal's pixel: ")[1].split(" ms")[0]) > 0  # the goal step's decode, timed
    mfu = float(text.split("| MFU |")[1].split("\n")[2].split("|")[-2].strip().rstrip("%"))
    assert 0 < mfu < 100  # a measured fraction of a peak measured in the same run


def test_bench_at_a_real_size_times_latency_training_and_memory(tmp_path):
    """bench.py --size <a VLM folder or preset>: the real-size section alone, on a tiny VLM saved
    as a SmolVLM folder is (the presets take minutes on a CPU); checkpointing keeps fewer activations."""
    import bench
    from test_model import smolvlm_like
    path, *_ = smolvlm_like(tmp_path)
    out = tmp_path / "bench.md"
    bench.main(bench.Bench(quick=True, size=str(path), out=str(out)))
    text = out.read_text()
    assert "real size" in text and "Collection" not in text
    for row in ("VLM prefix pass", "end to end, teacher (10 steps)", "end to end, one-step student", "floor"):
        assert row in text
    plain, ckpt = (line.split("|") for line in text.splitlines() if line.startswith(("| plain", "| gradient checkpointing")))
    assert float(ckpt[4]) < float(plain[4])  # activations kept (MB)
