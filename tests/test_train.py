"""The three stages end to end on tiny data: checkpoints, exact resume, DDP, schedules, errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import etc
import model
import scaffold
import train_etc
import train_vla

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(batch=4, log_every=1, eval_every=1000, save_every=1000, holdout=2)  # episode 1 of 2: held out


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def stage1(etc_path, out, **kw):
    train_etc.main(train_etc.Config(**{**TINY, "etc_data": (str(etc_path),), "out": str(out), "steps": 3, **kw}))


def stage2(etc_path, init, out, **kw):
    cfg = dict(stage=2, action_data=str(etc_path), etc_data=(str(etc_path),), init=str(init), out=str(out),
               steps=4, eval_episodes=0, expert_warmup=2, warmup=2)
    train_vla.main(train_vla.Config(**{**TINY, **cfg, **kw}))


@pytest.fixture(scope="module")
def stage1_ckpt(etc_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("s1") / "stage1"
    stage1(etc_path, out, vision_lr=0.1)  # a vision rate of its own (the default is 1), to tell the groups apart
    return out


def test_stage1_writes_a_loadable_checkpoint_and_etc_accuracy(stage1_ckpt):
    vla = model.load(stage1_ckpt)
    assert (stage1_ckpt / "train_state.pt").is_file()
    groups = torch.load(stage1_ckpt / "train_state.pt", weights_only=False)["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [0.1, 1.0] and groups[0]["lr"] == pytest.approx(0.1 * groups[1]["lr"])
    log = rows(stage1_ckpt.with_name("stage1.log.jsonl"))
    assert [r["step"] for r in log[:3]] == [0, 1, 2] and all(r["lm"] > 0 for r in log[:3])
    assert set(log[-1]["etc"]) == set(etc.LEVELS)  # held-out ETC accuracy per level
    assert vla.cfg.head == "flow"


def test_a_first_phase_draws_only_its_kinds(etc_path, tmp_path, monkeypatch):
    """--first-kinds point marker --first-fraction 0.67 on data without markers: steps 0 and 1 of 3 train on
    points alone (the marker questions it lacks are left out), step 2 on the mixture."""
    drawn, real = [], etc.Samples.__call__
    monkeypatch.setattr(etc.Samples, "__call__", lambda self, j: drawn.append(self.kinds[j]) or real(self, j))
    stage1(etc_path, tmp_path / "stage1", first_kinds=("point", "marker"), first_fraction=0.67)
    assert len(drawn) == 12 and set(drawn[:8]) == {"point"} and set(drawn[8:]) != {"point"}  # batch 4, 3 steps
    mix = model.read_config(tmp_path / "stage1")["provenance"]["etc_mix"]
    assert mix["first_kinds"] == ["point"] and mix["first_steps"] == 2


def test_stages_2_and_3_chain_and_evaluate_closed_loop(etc_path, stage1_ckpt, tmp_path, monkeypatch):
    stage2(etc_path, stage1_ckpt, tmp_path / "stage2")
    s1, s2 = model.load(stage1_ckpt), model.load(tmp_path / "stage2")
    moved = [n for (n, a), b in zip(s1.vlm.state_dict().items(), s2.vlm.state_dict().values()) if not torch.equal(a, b)]
    assert moved  # stage 2 trains the bridged VLM
    assert s2.cfg.goal_step  # on by default for the flow head
    used = []  # the normalisation stage 3's action samples are built with
    real = data.ActionSamples.__init__
    monkeypatch.setattr(data.ActionSamples, "__init__", lambda self, *a, **k: used.append(k.get("stats")) or real(self, *a, **k))
    train_vla.main(train_vla.Config(stage=3, action_data=str(etc_path), etc_data=(str(etc_path),),
                                    init=str(tmp_path / "stage2"), out=str(tmp_path / "stage3"), steps=2,
                                    eval_episodes=1, **TINY))
    summary = rows(tmp_path / "stage3.log.jsonl")[-1]
    assert set(summary["success"]) == {"reach", "pick-place"} and "success_ood" not in summary  # no markers: no novel words
    assert all(v in (0.0, 1.0) for v in summary["success"].values())
    s3 = model.load(tmp_path / "stage3")
    assert s3.cfg.head == "flow" and s3.stats == s2.stats and used == [s2.stats]  # the policy keeps its normalisation


def test_resume_after_ctrl_c_gives_the_same_losses(etc_path, stage1_ckpt, tmp_path, monkeypatch):
    stage2(etc_path, stage1_ckpt, tmp_path / "a", steps=6)
    whole = rows(tmp_path / "a.log.jsonl")[:6]
    real = data.Batches.__call__

    def interrupt_at_3(self, step, *args):
        if step == 3:
            raise KeyboardInterrupt
        return real(self, step, *args)
    monkeypatch.setattr(data.Batches, "__call__", interrupt_at_3)
    with pytest.raises(SystemExit) as stop:
        stage2(etc_path, stage1_ckpt, tmp_path / "b", steps=6)
    assert stop.value.code == 130
    assert torch.load(tmp_path / "b" / "train_state.pt", weights_only=False)["step"] == 3
    monkeypatch.undo()
    stage2(etc_path, stage1_ckpt, tmp_path / "b", steps=6, resume=True)
    resumed = rows(tmp_path / "b.log.jsonl")[:6]
    for a, b in zip(whole, resumed):
        assert a["step"] == b["step"]
        for k in ("lm", "flow"):
            assert a.get(k) == pytest.approx(b.get(k), rel=1e-5, abs=1e-6), (a, b)


def test_ddp_two_gloo_processes_match_one_process(etc_path, stage1_ckpt, tmp_path):
    args = ["--stage", "2", "--action-data", str(etc_path), "--etc-data", str(etc_path), "--init", str(stage1_ckpt),
            "--steps", "2", "--batch", "8", "--log-every", "1", "--eval-episodes", "0", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "train_vla.py", *args, "--out", str(tmp_path / "one")],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                          "train_vla.py", *args, "--out", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = rows(tmp_path / "one.log.jsonl")[:2], rows(tmp_path / "two.log.jsonl")[:2]
    for r1, r2 in zip(a, b):
        for k in ("lm", "flow"):
            assert r1[k] == pytest.approx(r2[k], rel=1e-4), (r1, r2)


def test_fsdp2_two_gloo_processes_match_one_process_and_resume(etc_path, stage1_ckpt, tmp_path):
    """--fsdp under torchrun: FSDP2 shards every VLM layer across two processes; the losses are
    one process's, the gathered checkpoint holds the same weights, and a sharded run resumes."""
    args = ["--stage", "2", "--action-data", str(etc_path), "--etc-data", str(etc_path), "--init", str(stage1_ckpt),
            "--batch", "8", "--log-every", "1", "--eval-episodes", "0", "--device", "cpu", "--warmup", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29537"]
    run = lambda launch, *more: subprocess.run([sys.executable, *launch, "train_vla.py", *args, *more], cwd=ROOT, env=env,  # noqa: E731
                                               capture_output=True, text=True)
    for launch, extra in (([], []), (two, ["--fsdp"])):  # 2 steps, then resumed for a third (a longer schedule)
        for more in (["--steps", "2"], ["--steps", "3", "--resume"]):
            r = run(launch, *extra, *more, "--out", str(tmp_path / ("two" if extra else "one")))
            assert r.returncode == 0, r.stderr[-2000:]
    a, b = ([r for r in rows(tmp_path / f"{n}.log.jsonl") if "lm" in r and "step" in r] for n in ("one", "two"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2]
    for r1, r2 in zip(a, b):
        for k in ("lm", "flow"):
            assert r1[k] == pytest.approx(r2[k], rel=1e-4), (r1, r2)
    # Adam moves a weight by up to about lr a step whatever its gradient's size, so a weight whose
    # gradient is at rounding level (the sharded sums round otherwise) may differ by up to that; seen:
    # 1 of 32,768 in one tensor, by 4e-5, when stage 1 ran on one thread. So: at most 0.1% of a tensor, by
    # at most stage 2's lr for each step run; every other weight agrees to 1e-4.
    one, two = model.load(tmp_path / "one"), model.load(tmp_path / "two")
    for (name, p1), p2 in zip(one.state_dict().items(), two.state_dict().values()):
        off = ~torch.isclose(p1, p2, rtol=1e-4, atol=1e-5)
        assert off.float().mean() <= 1e-3 and ((p1 - p2).abs() * off).max() <= len(a) * train_vla.STAGES[2]["lr"], name
    assert torch.load(tmp_path / "two" / "train_state.pt", weights_only=False)["fsdp"] is True


def test_etc_fraction_seen_follows_the_schedule(etc_path, stage1_ckpt, tmp_path):
    stage2(etc_path, stage1_ckpt, tmp_path / "s", steps=40, batch=8, etc_start=0.8, etc_end=0.2, log_every=20,
           expert_warmup=0)
    log = [r for r in rows(tmp_path / "s.log.jsonl") if "etc_frac" in r]
    sched = data.Ramp("cosine", 0.8, 0.2, 40)
    for r in log[1:]:  # each logged fraction is the mean over the last 20 steps
        want = sum(sched(s) for s in range(r["step"] - 19, r["step"] + 1)) / 20
        assert abs(r["etc_frac"] - want) < 0.06, (r, want)


def test_checkpoints_record_what_trained_them(etc_path, stage1_ckpt, tmp_path):
    stage2(etc_path, stage1_ckpt, tmp_path / "s2", steps=3)
    train_vla.main(train_vla.Config(stage=3, action_data=str(etc_path), etc_data=(str(etc_path),), init=str(tmp_path / "s2"),
                                    out=str(tmp_path / "s3"), steps=2, eval_episodes=0, **TINY))
    p1, p2, p3 = (model.read_config(p)["provenance"] for p in (stage1_ckpt, tmp_path / "s2", tmp_path / "s3"))
    assert (p1["script"], p1["stage"], p1["action_steps"], p1["parent"]) == ("train_etc.py", 1, 0, None)
    assert (p2["script"], p2["stage"], p2["action_steps"], p2["parent"]) == ("train_vla.py", 2, 3, str(stage1_ckpt))
    assert (p3["stage"], p3["action_steps"], p3["parent"]) == (3, 3 + 2, str(tmp_path / "s2"))
    assert p2["datasets"] == dict(actions=str(etc_path), etc=[str(etc_path)]) and p2["seed"] == 0
    assert p2["etc_mix"] == dict(levels=list(etc.LEVELS), kind_weights=dict(marker=20.0, goal=20.0), start=0.5, end=0.2)
    assert p2["config"]["steps"] == 3
    assert p1["code"] is None or len(p1["code"].removesuffix("+dirty")) == 40  # the git commit, when known


def test_an_interval_of_zero_means_never(etc_path, tmp_path):
    stage1(etc_path, tmp_path / "z", steps=4, save_every=0, eval_every=0, log_every=0)
    log = rows(tmp_path / "z.log.jsonl")
    assert [r["step"] for r in log if "lm" in r] == [3] and "etc" in log[-1]  # the last step only, then the summary
    assert torch.load(tmp_path / "z" / "train_state.pt", weights_only=False)["step"] == 4


def test_action_weight_schedule_scales_the_action_loss(etc_path, stage1_ckpt, tmp_path, monkeypatch):
    seen = []
    real = model.global_loss
    monkeypatch.setattr(model, "global_loss", lambda terms, weights, world: seen.append(dict(weights)) or real(terms, weights, world))
    stage2(etc_path, stage1_ckpt, tmp_path / "w", steps=3, action_weight_start=0.0, action_weight_end=2.0)
    sched = data.Ramp("cosine", 0.0, 2.0, 3)
    assert [w["flow"] for w in seen] == [sched(s) for s in range(3)] and all(w["lm"] == 1.0 for w in seen)


def test_the_goal_step_writes_the_goal_pixel_and_the_policy_acts_on_its_own_answer(etc_path, stage1_ckpt, tmp_path, monkeypatch):
    ds = data.Dataset(etc_path)
    steps = etc.GoalSteps(data.ActionSamples(ds, 8))
    # Teacher forcing: the answer is the goal pixel the ETC goal record gives for the same frame.
    goals = {(r["task"], r["frame"]): r["answer"] for r in etc.read(etc_path / "etc.jsonl") if r["question"] == "where is the goal?"}
    checked = 0
    for j, (task, i) in enumerate(steps.actions.index):
        if (task, i) in goals:
            s = steps(j, np.random.default_rng(0))
            assert s["text"].startswith("question: where is the goal of: ") and s["answer"] == goals[task, i]
            checked += 1
    assert checked > 10
    stage2(etc_path, stage1_ckpt, tmp_path / "goal", goal_step=True)
    vla = model.load(tmp_path / "goal")
    assert vla.cfg.goal_step
    batch = data.collate([steps(j, np.random.default_rng(j)) for j in range(4)], vla.tokenizer, vla.image_ids)
    terms = vla(act=batch)
    assert terms["lm"][1] == (batch["labels"] != -100).sum() > 0  # the VLM is taught the answer, the expert the chunk
    # The policy asks first and the expert reads the VLM's own answer, whatever it wrote.
    said, collated = [], []
    real_answers, real_collate = scaffold.answers, data.collate
    monkeypatch.setattr(scaffold, "answers", lambda *a, **k: said.extend(real_answers(*a, **k)) or said[-1:])
    monkeypatch.setattr(data, "collate", lambda samples, *a: collated.append(samples) or real_collate(samples, *a))
    image, proprio = ds.arrays["reach"]["images"][0], ds.arrays["reach"]["proprio"][0]
    chunk = scaffold.policy(vla)(np.asarray(image), "reach the goal", proprio)
    assert chunk.shape == (8, 4) and len(said) == 1
    assert collated[-1][0]["text"] == "question: where is the goal of: reach the goal?\nanswer:" and collated[-1][0]["answer"] == said[0]


def test_the_token_head_has_no_goal_step(etc_path, stage1_ckpt, tmp_path):
    """The token head writes its actions as text itself: the goal step, on by default, is the flow head's."""
    stage2(etc_path, stage1_ckpt, tmp_path / "tokens", head="tokens", steps=1)
    assert not model.load(tmp_path / "tokens").cfg.goal_step


def test_the_vision_tower_trains_at_its_own_fraction_of_the_learning_rate():
    torch.manual_seed(0)
    vla = model.VLA(model.VLAConfig())
    groups = scaffold.param_groups(vla, 0.1, skip="expert.")
    opt = torch.optim.AdamW(groups, lr=1.0)
    scaffold.set_lr(opt, 2e-3)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(2e-4), 2e-3]
    vision = {id(p) for p in vla.vlm.model.vision_model.parameters()}
    assert {id(p) for p in groups[0]["params"]} == vision
    names = {id(p): n for n, p in vla.named_parameters()}
    assert not any(names[id(p)].startswith("expert.") for g in groups for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == sum(1 for n, _ in vla.named_parameters() if not n.startswith("expert."))
