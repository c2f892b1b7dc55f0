"""Datasets, the mixing sampler and collation, on real collected data."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data
import etc
import sim

ROOT = Path(__file__).resolve().parents[1]


def test_collection_is_identical_for_one_and_two_workers(tmp_path):
    arrays = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        data.collect(data.Collect(tasks=("button-press-topdown",), episodes=2, out=str(out), workers=workers, seed=5))
        ds = data.Dataset(out)
        arrays.append({k: np.asarray(v) for k, v in ds.arrays["button-press-topdown"].items()})
        meta = ds.meta
    assert arrays[0].keys() == arrays[1].keys()
    for k in arrays[0]:
        np.testing.assert_array_equal(arrays[0][k], arrays[1][k], err_msg=k)
    assert meta["tasks"]["button-press-topdown"]["episodes"] == 2


def test_dataset_layout_and_stats(dataset):
    m = dataset.meta
    assert m["format_version"] == data.FORMAT_VERSION and m["has_actions"] and m["image_size"] == 64
    for task in dataset.tasks:
        a = dataset.arrays[task]
        n = m["tasks"][task]["frames"]
        assert a["images"].shape == (n, 64, 64, 3) and a["images"].dtype == np.uint8
        assert a["actions"].shape == (n, 4) and np.abs(a["actions"]).max() <= 1.0
        assert a["proprio"].shape == (n, 4)
        assert sorted(set(a["episode"])) == [0, 1]
        for frames in dataset.episode_frames(task):  # every kept episode ends in success
            assert a["success"][frames[-1]] and not a["success"][frames[0]]
            np.testing.assert_array_equal(a["step"][frames], np.arange(len(frames)))
    acts = np.concatenate([dataset.arrays[t]["actions"] for t in dataset.tasks])
    np.testing.assert_allclose(m["stats"]["actions"]["mean"], acts.mean(0), atol=1e-5)


@pytest.mark.parametrize("schedule", [data.Ramp("constant", 0.3, 0.3, 200),
                                      data.Ramp("linear", 0.8, 0.2, 200),
                                      data.Ramp("cosine", 0.5, 0.1, 200)])
def test_sampler_etc_fraction_follows_the_schedule(schedule):
    levels = ["scene"] * 500 + ["task"] * 300 + ["planning"] * 200
    s = data.MixedSampler(levels, n_action=1000, batch_size=32, etc_fraction=schedule, seed=1)
    for lo in (0, 100):  # two windows of 100 steps: the fraction seen vs the schedule's mean
        seen = np.mean([len(s.batch(t)[0]) / 32 for t in range(lo, lo + 100)])
        want = np.mean([schedule(t) for t in range(lo, lo + 100)])
        assert abs(seen - want) < 0.02, (lo, seen, want)
    assert all(len(e) + len(a) == 32 for e, a in map(s.batch, range(50)))


def test_sampler_level_weights_and_determinism():
    levels = ["scene"] * 500 + ["task"] * 300 + ["planning"] * 200
    s = data.MixedSampler(levels, 100, 64, data.Ramp("constant", 1.0, 1.0), {"scene": 1, "task": 3, "planning": 0}, seed=2)
    picked = np.concatenate([s.batch(t)[0] for t in range(100)])
    frac_task = np.mean(np.array(levels)[picked] == "task")
    assert abs(frac_task - 0.75) < 0.03 and "planning" not in set(np.array(levels)[picked])
    again = data.MixedSampler(levels, 100, 64, data.Ramp("constant", 1.0, 1.0), {"scene": 1, "task": 3, "planning": 0}, seed=2)
    for t in (0, 17, 99):  # batch t is a function of (seed, t): exact resume at any step
        np.testing.assert_array_equal(s.batch(t)[0], again.batch(t)[0])


def test_sampler_kind_weights_split_a_level_and_default_to_uniform():
    levels = ["scene"] * 500 + ["task"] * 500
    kinds = ["marker"] * 100 + ["point"] * 400 + ["goal"] * 500
    full = data.Ramp("constant", 1.0, 1.0)
    s = data.MixedSampler(levels, 0, 64, full, seed=3, etc_kinds=kinds, kind_weights={"marker": 4})
    picked = np.array(kinds)[np.concatenate([s.batch(t)[0] for t in range(200)])]
    # the scene level keeps half the batch; in it 100 markers x 4 weigh as much as 400 points x 1
    assert abs(np.mean(picked == "marker") - 0.25) < 0.02 and abs(np.mean(picked == "goal") - 0.5) < 0.02
    none = data.MixedSampler(levels, 0, 64, full, seed=3, etc_kinds=kinds, kind_weights={"point": 0})
    assert "point" not in set(np.array(kinds)[np.concatenate([none.batch(t)[0] for t in range(50)])])
    plain, ones = data.MixedSampler(levels, 0, 64, full, seed=3), data.MixedSampler(levels, 0, 64, full, seed=3, etc_kinds=kinds)
    for t in (0, 9):  # no weights: the same batches as a sampler that knows no kinds
        np.testing.assert_array_equal(plain.batch(t)[0], ones.batch(t)[0])


def test_collate_masks_labels_to_the_answer(dataset, tokenizer):
    recs = etc.records(dataset)[:3]
    image_ids = tokenizer.convert_tokens_to_ids(["<image>"]) * 4
    samples = [etc.sample(dataset, r) for r in recs]
    b = data.collate(samples, tokenizer, image_ids)
    B, L = b["input_ids"].shape
    assert b["images"].shape == (3, 64, 64, 3) and b["labels"].shape == (B, L)
    for i, r in enumerate(recs):
        ids, lab, att = b["input_ids"][i].tolist(), b["labels"][i].tolist(), b["attention_mask"][i].tolist()
        n = sum(att)
        assert ids[0] == tokenizer.bos_token_id and ids[1:5] == image_ids
        answer = tokenizer(" " + r["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        kept = [t for t in lab if t != -100]
        assert kept == answer and lab[n - len(answer):n] == answer  # the answer, at the end
        assert all(t == -100 for t in lab[:n - len(answer)] + lab[n:])  # prompt and padding
        assert ids[n:] == [tokenizer.pad_token_id] * (L - n)
        assert tokenizer.decode(ids[5:n - len(answer)]) == samples[i]["text"]


def test_action_samples_chunk_pad_and_mask(dataset, tokenizer):
    acts = data.ActionSamples(dataset, chunk=8)
    a = dataset.arrays["reach"]
    last = dataset.episode_frames("reach")[0][-1]
    j = acts.index.index(("reach", int(last) - 2))  # 3 frames left in the episode
    rng = np.random.default_rng(0)
    s = acts(j, rng)
    np.testing.assert_array_equal(s["action_mask"], [1, 1, 1, 0, 0, 0, 0, 0])
    raw = s["actions"] * acts.a_std + acts.a_mean
    np.testing.assert_allclose(raw[:3], a["actions"][last - 2:last + 1], atol=1e-5)
    np.testing.assert_allclose(raw[3:], np.repeat(raw[2:3], 5, 0), atol=1e-6)
    assert s["text"].strip() in sim.instructions("reach", None, "train")
    other = {k: {"mean": [1.0] * 4, "std": [2.0] * 4} for k in ("actions", "proprio")}
    s2 = data.ActionSamples(dataset, chunk=8, stats=other)(j, np.random.default_rng(0))
    np.testing.assert_allclose(s2["actions"][0] * 2 + 1, a["actions"][last - 2], atol=1e-5)
    b = data.collate([s, acts(0, rng)], tokenizer, [tokenizer.convert_tokens_to_ids("<image>")])
    assert b["actions"].shape == (2, 8, 4) and b["proprio"].shape == (2, 4)
    assert (b["labels"] == -100).all()  # action samples carry no language target


def test_grounded_samples_name_their_episodes_goal_marker(tmp_path):
    var = sim.Variation(markers=3, ambiguous=0.5)
    ds = data.Dataset(data.collect(data.Collect(tasks=("reach",), episodes=4, out=str(tmp_path / "g"), workers=1, variation=var)))
    a, acts, rng = ds.arrays["reach"], data.ActionSamples(ds, chunk=8), np.random.default_rng(0)
    assert a["markers"].shape[1:] == (3, 3) and a["markers_px"].shape[1:] == (3, 2) and ds.meta["marker_colors"] == list(var.marker_colors)
    for frames in ds.episode_frames("reach"):
        k = int(a["goal_marker"][frames[0]])
        assert (a["goal_marker"][frames] == k).all() and np.allclose(a["goal"][frames[0]], a["markers"][frames[0], k])
        word = data.goal_word(ds, "reach", frames[-1])
        assert word == var.marker_colors[a["marker_color"][frames[0], k]]
        assert f"the {word} " in acts(acts.index.index(("reach", int(frames[-1]))), rng)["text"]


def test_goals_per_layout_demonstrate_one_image_toward_each_marker(tmp_path):
    var = sim.Variation(markers=3)
    cfg = data.Collect(tasks=("reach", "button-press-topdown"), episodes=1, goals_per_layout=3, out=str(tmp_path / "cf"),
                       workers=1, variation=var)
    ds = data.Dataset(data.collect(cfg))
    a, firsts = ds.arrays["reach"], [f[0] for f in ds.episode_frames("reach")]
    assert len(firsts) == 3 and ds.meta["tasks"]["button-press-topdown"]["episodes"] == 1  # no markers: one demo
    np.testing.assert_array_equal(a["images"][firsts[0]], a["images"][firsts[2]])  # one layout, one image ...
    assert [int(a["goal_marker"][f]) for f in firsts] == [0, 1, 2]  # ... each marker named in turn
    assert len({data.goal_word(ds, "reach", f) for f in firsts}) == 3
    ends = [f[-1] for f in ds.episode_frames("reach")]
    for f0, f1 in zip(firsts, ends):  # and each demonstration ends at its own marker
        assert np.linalg.norm(a["hand"][f1] - a["markers"][f0, a["goal_marker"][f0]]) < 0.05
    with pytest.raises(data.DataError, match="--goals-per-layout 4: use 1 to --variation.markers"):
        data.collect(data.Collect(tasks=("reach",), goals_per_layout=4, out=str(tmp_path / "x"), variation=var))
    assert not (tmp_path / "x").exists()


def test_frame_every_keeps_every_nth_step_of_the_same_rollout_and_its_etc(tmp_path):
    var = sim.Variation(markers=3)
    sets = [data.Dataset(data.collect(data.Collect(tasks=("reach",), episodes=2, out=str(tmp_path / f"f{n}"), workers=1,
                                                    variation=var, actions=False, frame_every=n))) for n in (1, 4)]
    full, kept = (ds.arrays["reach"] for ds in sets)
    last = np.zeros(len(full["step"]), bool)
    last[[f[-1] for f in sets[0].episode_frames("reach")]] = True
    every4 = np.flatnonzero((np.asarray(full["step"]) % 4 == 0) | last)  # and each episode's end
    np.testing.assert_array_equal(kept["step"], full["step"][every4])
    for k in ("images", "hand", "markers_px", "episode"):
        np.testing.assert_array_equal(kept[k], full[k][every4], err_msg=k)
    # ETC asks the same steps the same questions with the same answers (waypoints and moves are 4 steps apart)
    recs = [{(r["episode"], r["step"], r["kind"], r["question"], r["answer"]) for r in etc.records(ds)} for ds in sets]
    assert recs[0] == recs[1] and {k for _, _, k, _, _ in recs[0]} >= {"marker", "trajectory", "motion", "goal"}
    with pytest.raises(data.DataError, match="--frame-every 4: use 1, 2 or 4 .* only with --no-actions"):
        data.collect(data.Collect(tasks=("reach",), out=str(tmp_path / "x"), frame_every=4))
    assert not (tmp_path / "x").exists()


def test_bad_inputs_give_one_clear_error_and_keep_what_is_on_disk(tmp_path, dataset_path):
    with pytest.raises(data.DataError, match="no dataset at"):
        data.Dataset(tmp_path / "missing")
    with pytest.raises(data.DataError, match="--image-size 96"):
        data.Dataset(dataset_path, image_size=96)
    # an existing dataset is never replaced without --overwrite
    before = (dataset_path / "meta.json").read_bytes()
    with pytest.raises(data.DataError, match="--overwrite"):
        data.collect(data.Collect(tasks=("reach",), episodes=1, out=str(dataset_path)))
    assert (dataset_path / "meta.json").read_bytes() == before
    # corrupt files
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(data.DataError, match="corrupt"):
        data.Dataset(bad)
    (bad / "etc.jsonl").write_text('{"task": "reach"}\n')
    with pytest.raises(data.DataError, match="etc.jsonl:1"):
        etc.read(bad / "etc.jsonl")


@pytest.mark.parametrize("args, message", [
    (["collect", "--tasks", "pussh"], "unknown task 'pussh'; valid tasks: assembly"),
    (["collect", "--variation.object-color", "blurple"], "unknown colour 'blurple'"),
])
def test_cli_bad_input_exits_non_zero_with_one_line(tmp_path, args, message):
    r = subprocess.run([sys.executable, "data.py", *args, "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x").exists()
