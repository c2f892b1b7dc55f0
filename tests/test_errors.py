"""Bad input, script by script: one clear line that names the fix, exit code 2, and nothing
already on disk changed. Each case runs the script's own command line (data.cli, as its
`__main__` does) in this process; the last test runs every script's `__main__` for real."""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import distill_sdm
import etc
import eval as ev
import report
import model
import train_etc
import train_vla

ROOT = Path(__file__).resolve().parents[1]
CLI = {"data.py": (data.collect, {"collect": data.Collect}), "etc.py": (etc.write, etc.Etc), "train_etc.py": (train_etc.main, train_etc.Config),
       "train_vla.py": (train_vla.main, train_vla.Config), "distill_sdm.py": (distill_sdm.main, distill_sdm.Config),
       "eval.py": (lambda cmd: ev.RUN[type(cmd)](cmd), ev.COMMANDS),
       "report.py": (report.report, report.Report)}


def snapshot(root: Path) -> dict:
    """Every file under root with a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(etc_path, tmp_path_factory):
    """A folder with the tiny dataset, a stage-1 and a stage-2 checkpoint, and damaged copies."""
    root = tmp_path_factory.mktemp("errors")
    shutil.copytree(etc_path, root / "ds")
    tiny = dict(batch=4, log_every=0, eval_every=0, save_every=0, holdout=2)
    train_etc.main(train_etc.Config(etc_data=(str(root / "ds"),), out=str(root / "stage1"), steps=2, **tiny))
    train_vla.main(train_vla.Config(stage=2, action_data=str(root / "ds"), etc_data=(str(root / "ds"),), init=str(root / "stage1"),
                                    out=str(root / "stage2"), steps=2, eval_episodes=0, **tiny))
    torch.manual_seed(0)
    model.VLA(model.VLAConfig(head="tokens")).save(root / "tokens")
    for name, damage in DAMAGE.items():
        shutil.copytree(root / "stage2", root / name)
        damage(root / name)
    (root / "nometa").mkdir()
    (root / "nometa" / "meta.json").write_text("{not json")
    shutil.copytree(root / "ds", root / "noetc", ignore=shutil.ignore_patterns("etc.jsonl"))
    shutil.copytree(root / "noetc", root / "emptyetc")
    (root / "emptyetc" / "etc.jsonl").write_text("")
    (root / "README.md").write_text("no generated section here\n")
    return root


def truncate(f: Path):
    f.write_bytes(f.read_bytes()[:1000])


DAMAGE = {
    "truncated": lambda p: truncate(p / "model.safetensors"),
    "noconfig": lambda p: (p / "config.json").unlink(),
    "oldformat": lambda p: (p / "config.json").write_text(json.dumps({**json.loads((p / "config.json").read_text()), "format": "bridgevla-vla-1"})),
    "badjson": lambda p: (p / "config.json").write_text("{"),
    "notokenizer": lambda p: (p / "tokenizer.json").unlink(),
    "badstate": lambda p: truncate(p / "train_state.pt"),
}

CASES = [  # (script, arguments with {w} for the folder, what the one line must say)
    ("data.py", "collect --tasks reach --episodes 0 --out {w}/new", "--episodes 0: use 1 or more"),
    ("data.py", "collect --tasks reach --episodes -3 --out {w}/new", "--episodes -3: use 1 or more"),
    ("data.py", "collect --tasks reach --workers 0 --out {w}/new", "--workers 0: use 1 or more"),
    ("data.py", "collect --tasks reach --image-size 7 --out {w}/new", "--image-size 7: use a multiple of the tiny VLM's 16 px patch"),
    ("data.py", "collect --tasks reach --image-size 72 --out {w}/new", "--image-size 72: use a multiple of the tiny VLM's 16 px patch"),
    ("etc.py", "--data {w}/ds --every 0", "--every 0: use 1 or more"),
    ("train_etc.py", "--etc-data {w}/ds --steps 2 --batch 0 --out {w}/new", "--batch 0: use 1 or more"),
    ("train_etc.py", "--etc-data {w}/ds --steps -1 --out {w}/new", "--steps -1: use 1 or more"),
    ("train_etc.py", "--etc-data {w}/emptyetc --out {w}/new", "{w}/emptyetc/etc.jsonl holds no ETC records; regenerate it"),
    ("etc.py", "--data {w}/missing", "no dataset at {w}/missing: run `python data.py collect"),
    ("etc.py", "--data {w}/nometa", "meta.json is corrupt"),
    ("train_etc.py", "--etc-data {w}/noetc --out {w}/new", "no ETC records at {w}/noetc/etc.jsonl: run `python etc.py --data {w}/noetc`"),
    ("train_etc.py", "--etc-data {w}/ds --out {w}/stage1", "{w}/stage1 exists; pass --resume to continue it, --overwrite"),
    ("train_etc.py", "--etc-data {w}/ds --out {w}/fresh --resume", "nothing to resume at {w}/fresh"),
    ("train_etc.py", "--etc-data {w}/ds --out {w}/new --kind-weights markers 8", "--kind-weights markers: the kinds are point box"),
    ("train_etc.py", "--etc-data {w}/ds --out {w}/new --first-fraction 1", "--first-fraction 1.0: a fraction of the steps"),
    ("train_vla.py", "--stage 3 --init {w}/none --action-data {w}/ds --etc-data {w}/ds --out {w}/new",
     "run stage 2 first (`python train_vla.py --stage 2`)"),
    ("train_vla.py", "--stage 3 --init {w}/stage1 --action-data {w}/ds --etc-data {w}/ds --out {w}/new",
     "{w}/stage1's action expert was never trained (it was written by train_etc.py, stage 1)"),
    ("train_vla.py", "--stage 3 --init {w}/stage2 --head tokens --action-data {w}/ds --etc-data {w}/ds --out {w}/new",
     "pass --head flow --chunk 8"),
    ("train_vla.py", "--stage 2 --init {w}/stage1 --action-data {w}/ds --etc-data {w}/ds --out {w}/badstate --resume",
     "{w}/badstate/train_state.pt cannot be resumed from"),
    ("train_vla.py", "--stage 2 --init {w}/stage1 --action-data {w}/ds --etc-data {w}/ds --batch 0 --out {w}/new",
     "--batch 0: use 1 or more"),
    ("eval.py", "success --ckpt {w}/stage1 --data {w}/ds", "{w}/stage1's action expert was never trained"),
    ("eval.py", "success --ckpt {w}/stage2 --data {w}/ds --episodes 0", "--episodes 0: use 1 or more"),
    ("eval.py", "grounding --ckpt {w}/stage2 --data {w}/ds --layouts 0", "--layouts 0: use 1 or more"),
    ("eval.py", "etc --ckpt {w}/stage2 --data {w}/ds --limit 0", "--limit 0: use 1 or more"),
    ("eval.py", "success --ckpt {w}/stage2 --data {w}/ds --object-colors bleu", "unknown colour 'bleu'"),
    ("eval.py", "etc --ckpt {w}/truncated --data {w}/ds", "{w}/truncated/model.safetensors is truncated or corrupt"),
    ("eval.py", "etc --ckpt {w}/noconfig --data {w}/ds", "no checkpoint at {w}/noconfig"),
    ("eval.py", "etc --ckpt {w}/oldformat --data {w}/ds", "written by another version of bridgevla (format 'bridgevla-vla-1'"),
    ("eval.py", "etc --ckpt {w}/badjson --data {w}/ds", "config.json is corrupt"),
    ("eval.py", "etc --ckpt {w}/notokenizer --data {w}/ds", "{w}/notokenizer has no tokenizer.json"),
    ("report.py", "--results {w}/none --readme {w}/README.md", "has no generated section"),
    ("distill_sdm.py", "--teacher {w}/stage1 --data {w}/ds --out {w}/new", "{w}/stage1's action expert was never trained"),
    ("distill_sdm.py", "--teacher {w}/tokens --data {w}/ds --out {w}/new", "distillation needs a flow-head teacher"),
    ("distill_sdm.py", "--teacher {w}/stage2 --data {w}/ds --out {w}/stage1", "{w}/stage1 exists"),
    ("distill_sdm.py", "--teacher {w}/stage2 --data {w}/ds --steps 0 --out {w}/new", "--steps 0: use 1 or more"),
]


@pytest.mark.parametrize("script, args, message", CASES, ids=[f"{c[0]} {c[1].split(' --out')[0]}" for c in CASES])
def test_bad_input_gives_one_line_exit_2_and_changes_nothing(world, script, args, message, capsys):
    before = snapshot(world)
    run, config = CLI[script]
    with pytest.raises(SystemExit) as stop:
        data.cli(run, config, args.format(w=world).split())
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2, err
    assert err.startswith("error: ") and message.format(w=world) in err and len(err.splitlines()) == 1, err
    assert snapshot(world) == before


def test_a_diverging_run_stops_and_keeps_the_last_checkpoint(world, monkeypatch, capsys):
    before = snapshot(world)
    monkeypatch.setattr(model, "global_loss", lambda *a, **k: (torch.tensor(float("nan")), {"lm": float("nan")}))
    with pytest.raises(SystemExit) as stop:
        data.cli(train_etc.main, train_etc.Config, f"--etc-data {world}/ds --out {world}/stage1 --resume --steps 4".split())
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "lower --lr" in err and "is kept" in err
    assert snapshot(world) == before


@pytest.mark.parametrize("argv, message", [
    (["etc.py", "--data", "/nonexistent/ds"], "no dataset at /nonexistent/ds"),
    (["train_etc.py", "--etc-data", "/nonexistent/ds", "--out", "{tmp}/x"], "no dataset at /nonexistent/ds"),
    (["train_vla.py", "--stage", "3", "--init", "{tmp}/none", "--action-data", "{ds}", "--out", "{tmp}/x"], "run stage 2 first"),
    (["distill_sdm.py", "--teacher", "{tmp}/none", "--out", "{tmp}/x"], "no teacher at"),
    (["eval.py", "etc", "--ckpt", "{tmp}/none"], "no checkpoint at"),
], ids=["etc", "train_etc", "train_vla", "distill_sdm", "eval"])
def test_every_script_exits_2_with_one_line_from_the_shell(argv, message, etc_path, tmp_path):
    argv = [a.format(tmp=tmp_path, ds=etc_path) for a in argv]
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x").exists()
