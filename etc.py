"""ETC: embodied trajectory-coupled vision-language data (three levels, OOD), records, scoring.

    python etc.py --data data/source                     # -> data/source/etc.jsonl
    python etc.py --data data/ood --paraphrases heldout  # OOD ETC: held-out phrasings

Made from the same trajectories as the actions, answers exact from the simulator state and the
camera, in the paper's three levels: scene grounding (where things are), task-oriented (where to
act, what comes next, is it done), action-aligned planning (the gripper's path, its relation to
the object, its next move). A record is a JSON line pointing at a frame; never an action label:

    {"task": "push", "frame": 40, "episode": 0, "step": 40, "level": "planning", "kind": "trajectory",
     "question": "predict the trajectory of: push the puck to the goal", "answer": "30 40, 30 38, ..."}

The model reads "question: <q>\\nanswer:" after the image and learns the answer with the next-token
loss; `scores` grades greedy answers per level. Stands on data.py and sim.py; nothing below imports it.
"""
import json, math, re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

import data, sim

LEVELS = ("scene", "task", "planning")  # the paper's three ETC levels
PHASES = ("approach", "grasp", "lift", "move to goal", "release", "push", "pull", "done")
COORDS = ("point", "box", "contact", "trajectory", "marker", "goal")  # kinds whose answers are pixel coordinates
KINDS = (*COORDS, "gripper", "color", "nearest", "subgoal", "done", "relation", "motion")  # every question kind
SECOND_NOUN = {"hammer": "nail", "stick-push": "thermos", "stick-pull": "thermos"}

# --- Phases: the sub-goal plan of an episode, labelled by rules -------------------------------
def label_phases(hand: np.ndarray, grip: np.ndarray, obj: np.ndarray, contact: np.ndarray,
                 success: np.ndarray, task: str) -> list[str]:
    """A PHASES name per step, from the state, the contacts and the expert's grip command.
    hand, obj: (T, 3) gripper and main-object positions; grip: (T,) grip command (> 0 closes);
    contact: (T,) World.contact() codes; success: (T,) bool. Reach tasks: move to goal, done."""
    dist = np.linalg.norm(hand - obj, axis=1)
    moved = np.linalg.norm(obj - obj[0], axis=1) > 0.02  # has the object left its start?
    vel = np.diff(obj, axis=0, append=obj[-1:])  # (T, 3) object motion over the next step
    moving = np.linalg.norm(vel, axis=1) > 1e-3
    # pad contacts flicker from step to step: a grasp seen in the last 5 steps still holds
    gripped = np.convolve(contact == 2, np.ones(5), "full")[:len(hand)] > 0
    holding = (grip > 0) & gripped
    phases, carried = [], False
    for t in range(len(hand)):
        if success[t]:
            p = "done"
        elif task.startswith("reach"):
            p = "move to goal"
        elif holding[t] and moved[t]:
            carried = True  # mostly upward motion is a lift, the rest is transport
            p = "lift" if vel[t, 2] > np.linalg.norm(vel[t, :2]) else "move to goal"
        elif grip[t] > 0 and (holding[t] or dist[t] < 0.05) and not moved[t]:
            p = "grasp"
        elif carried and grip[t] <= 0:
            p = "release"
        elif moving[t] and (contact[t] > 0 or dist[t] < 0.1):
            p = "pull" if vel[t, 1] < 0 else "push"  # toward the robot is a pull
        else:
            p = "approach"
        phases.append(p)
    return phases

# --- Questions and answers for one frame ------------------------------------------------------
def pt(uv) -> str:
    return f"{int(uv[0])} {int(uv[1])}"  # the pixel that contains the point

def named_pt(word: str | None, uv) -> str:
    """A place the question asked for by a word (a colour): the word first, then the pixel, "blue 31 17".
    The word costs one token and is copied from the question; the pixel is then read right after the
    token that names it, where one attention step can fetch it (text recall: chance for 1,750 steps
    with the bare "31 17" behind a question's filler words, 0.975 at 750 with the word restated; results/binding)."""
    return pt(uv) if word is None else f"{word} {pt(uv)}"

GOAL_TOKENS = 16  # the most the goal step writes: "puck 30 40 blue 31 17" and <eos>, one token per digit (SmolVLM)

def goal_answer(task: str, word: str | None, goal_uv, object_uv=None) -> str:
    """The goal step's answer (and the ETC goal question's): the named goal, "blue 31 17"; where an
    object is moved to it (push), the object's pixel first, "puck 30 40 blue 31 17": the hand must
    get to a 3-5 px puck before the goal matters, and the expert reads a written pixel far better
    than it finds one in the image tokens (docs/notes.md, "Push: the goal step writes the puck")."""
    head = "" if object_uv is None else f"{sim.TEXT[task][0]} {pt(object_uv)} "
    return head + named_pt(word, goal_uv)

def inside(uv, size: int) -> bool:
    return bool(0 <= uv[0] < size and 0 <= uv[1] < size)

def camera_axes(cam_row: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(right, up, forward) unit vectors of the camera stored per frame."""
    _, fwd, up = sim.camera_pose(sim.Camera(tuple(cam_row[:3]), *cam_row[3:]))
    return np.cross(fwd, up), up, fwd

def relation(hand: np.ndarray, obj: np.ndarray, cam_row: np.ndarray, tol: float = 0.01) -> str:
    """Where the gripper is relative to the object, as the camera sees it."""
    right, _, fwd = camera_axes(cam_row)
    d = hand - obj
    side = "left" if d @ right < -tol else "right" if d @ right > tol else "aligned"
    height = "above" if d[2] > tol else "below" if d[2] < -tol else "level"
    depth = "in front" if d @ fwd < -tol else "behind" if d @ fwd > tol else "level"
    return f"{side}, {height}, {depth}"

def ahead(steps: np.ndarray, t: int, h: int) -> int:
    """The episode's first kept frame at least h steps after frame t (its last frame at the end).
    steps: (T,) the simulator step of each kept frame (every step, or every n-th: --frame-every)."""
    return min(int(np.searchsorted(steps, steps[t] + h)), len(steps) - 1)

def motion(hand: np.ndarray, grip: np.ndarray, steps: np.ndarray, t: int, cam_row: np.ndarray, h: int = 4) -> str:
    """The gripper's dominant move over the next h steps (camera frame), and a grip change (seen
    at the kept frames). h = 4, the waypoints' spacing: exact with --frame-every 1, 2 or 4."""
    right, _, fwd = camera_axes(cam_row)
    e = ahead(steps, t, h)
    d = hand[e] - hand[t]
    comps = {"right": d @ right, "up": d[2], "away from the camera": d @ fwd}
    name, v = max(comps.items(), key=lambda kv: abs(kv[1]))
    opposite = {"right": "left", "up": "down", "away from the camera": "toward the camera"}
    move = "stay" if np.linalg.norm(d) < 0.01 else (name if v > 0 else opposite[name])
    closing = grip[t:e + 1] > 0
    if closing.any() != closing.all():
        move += " and " + ("close" if closing[-1] else "open") + " the gripper"
    return move

def for_frame(a: dict, i: int, frames: np.ndarray, task: str, nouns: list[str], color: str | None,
              instruction: str, size: int, words: list[str] = ()) -> list[tuple[str, str, str, str]]:
    """(level, kind, question, answer) for frame i of the episode whose frames are `frames`.
    a: the task's arrays (with 'phase'); nouns: its objects, main first, with the colour word;
    words: the dataset's marker colour words (a['marker_color'] indexes them)."""
    box = lambda b: f"{pt(b[:2])} {pt(b[2:])}"  # noqa: E731
    out = []
    # scene grounding: where things are, the gripper's state, the object's colour
    for k, noun in enumerate(nouns):
        if inside(a["objects_px"][i, k], size):
            out += [("scene", "point", f"where is the {noun}?", pt(a["objects_px"][i, k])),
                    ("scene", "box", f"locate the {noun}", box(a["objects_box"][i, k]))]
    if inside(a["hand_px"][i], size):
        out += [("scene", "point", "where is the gripper?", pt(a["hand_px"][i])),
                ("scene", "box", "locate the gripper", box(a["hand_box"][i]))]
    goal = int(a["goal_marker"][i])  # -1: no markers, one goal marker that needs no name
    if goal < 0 and inside(a["goal_px"][i], size):
        out.append(("scene", "point", "where is the goal?", pt(a["goal_px"][i])))
    if goal >= 0:  # coloured markers: each unique colour's place, the colour nearest the gripper, the goal
        names = [words[c] for c in a["marker_color"][i]]
        out += [("scene", "marker", f"where is the {w} marker?", named_pt(w, uv))
                for w, uv in zip(names, a["markers_px"][i]) if names.count(w) == 1 and inside(uv, size)]
        near = np.argmin(np.linalg.norm(a["markers"][i] - a["hand"][i], axis=1))
        out.append(("scene", "nearest", "what colour is the marker nearest the gripper?", names[near]))
        obj = a["objects_px"][i, 0] if data.moves_object(task, goal) else None
        if inside(a["markers_px"][i, goal], size) and (obj is None or inside(obj, size)):
            out.append(("task", "goal", goal_question(instruction), goal_answer(task, names[goal], a["markers_px"][i, goal], obj)))
        out.append(("planning", "relation", f"where is the gripper relative to the {names[goal]} marker?",
                    relation(a["hand"][i], a["markers"][i, goal], a["camera"][i])))
    out.append(("scene", "gripper", "is the gripper open or closed?", "open" if a["proprio"][i, 3] > 0.5 else "closed"))
    if color:  # asked with the bare noun, or the question would give the answer away
        out.append(("scene", "color", f"what colour is the {sim.TEXT[task][0]}?", color))
    # task-oriented: where to act, what comes next, whether it is finished
    target = a["goal_px"][i] if task.startswith("reach") else a["objects_px"][i, 0]
    if inside(target, size):
        out.append(("task", "contact", f"where should the gripper act to {instruction}?", pt(target)))
    phases = a["phase"][frames]
    later = phases[(frames > i) & (phases != a["phase"][i])]
    out += [("task", "subgoal", f"what is the next step to {instruction}?", PHASES[later[0]] if len(later) else "done"),
            ("task", "done", f"is the task done: {instruction}?", "yes" if a["success"][i] else "no")]
    # action-aligned planning: the gripper's future path, its relation to the object, its next move
    steps, t = a["step"][frames], i - frames[0]  # the episode's simulator steps; frame i's place among them
    future = frames[[ahead(steps, t, 4 * j) for j in range(1, 6)]]  # 5 waypoints, 4 steps apart
    out += [("planning", "trajectory", f"predict the trajectory of: {instruction}",
             ", ".join(pt(p) for p in a["hand_px"][future].clip(0, size - 1))),
            ("planning", "relation", f"where is the gripper relative to the {nouns[0]}?",
             relation(a["hand"][i], a["objects"][i, 0], a["camera"][i])),
            ("planning", "motion", "where does the gripper move next?",
             motion(a["hand"][frames], a["grip"][frames], steps, t, a["camera"][i]))]
    return out

# --- Records of a dataset, on disk as JSON lines ----------------------------------------------
@dataclass
class Etc:
    data: str = "data/source"  # a dataset folder from `python data.py collect`
    every: int = 4  # questions for one frame in `every`
    paraphrases: Literal["train", "heldout"] = "train"  # instructions in task questions; heldout: OOD language
    seed: int = 0  # picks the instruction paraphrase per episode
    kinds: tuple[str, ...] = ()  # only these question kinds (e.g. the markers': marker nearest goal relation); () = all

def records(ds: data.Dataset, every: int = 4, paraphrases: str = "train", seed: int = 0) -> list[dict]:
    """All ETC records of a dataset, deterministic in (dataset, every, paraphrases, seed)."""
    rng, color, size, recs = np.random.default_rng(seed), ds.meta["color"], ds.meta["image_size"], []
    for task in ds.tasks:
        a = {k: np.asarray(v) for k, v in ds.arrays[task].items() if k not in ("images", "wrist")}
        eps = ds.episode_frames(task)
        a["phase"] = np.array([PHASES.index(p) for f in eps for p in label_phases(
            a["hand"][f], a["grip"][f], a["objects"][f, 0], a["contact"][f], a["success"][f], task)])
        noun = sim.TEXT[task][0]
        nouns = [f"{color} {noun}" if color else noun] + ([SECOND_NOUN[task]] if task in SECOND_NOUN else [])
        for ep, frames in enumerate(eps):
            texts = sim.instructions(task, color, paraphrases, marker=data.goal_word(ds, task, frames[0]))
            instruction = texts[rng.integers(len(texts))]
            for i in frames[a["step"][frames] % every == 0]:  # one step in `every` (kept frames: --frame-every)
                for level, kind, q, ans in for_frame(a, int(i), frames, task, nouns, color, instruction, size, ds.marker_words):
                    recs.append(dict(task=task, frame=int(i), episode=ep, step=int(a["step"][i]),
                                     level=level, kind=kind, question=q, answer=ans))
    return recs

def check_kinds(kinds, flag: str) -> None:
    """Stop on a question kind that does not exist, naming the ones that do."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise data.DataError(f"{flag} {' '.join(unknown)}: the kinds are {' '.join(KINDS)}")

def write(cfg: Etc) -> Path:
    check_kinds(cfg.kinds, "--kinds")
    data.check_positive(every=cfg.every)
    ds = data.Dataset(cfg.data)
    recs = [r for r in records(ds, cfg.every, cfg.paraphrases, cfg.seed) if not cfg.kinds or r["kind"] in cfg.kinds]
    out, tmp = ds.path / "etc.jsonl", ds.path / ".etc.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tmp.rename(out)  # derived from the dataset, so regenerating it loses nothing
    print(f"wrote {len(recs)} ETC records to {out}: { {lv: sum(r['level'] == lv for r in recs) for lv in LEVELS} }")
    return out

def read(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise data.DataError(f"no ETC records at {path}: run `python etc.py --data {path.parent}`")
    recs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            r = json.loads(line)
            assert {"task", "frame", "level", "question", "answer"} <= r.keys()
        except (json.JSONDecodeError, AssertionError):
            raise data.DataError(f"{path}:{n} is not an ETC record; regenerate it with `python etc.py --data {path.parent}`") from None
        recs.append(r)
    if not recs:
        raise data.DataError(f"{path} holds no ETC records; regenerate it with `python etc.py --data {path.parent}`")
    return recs

def held_out(rec: dict, every: int) -> bool:
    """Every `every`-th episode of each task is kept out of ETC training, for evaluation."""
    return rec["episode"] % every == every - 1

def load(paths, levels=LEVELS, holdout: int = 10, image_size: int | None = None) -> tuple[list, list[list]]:
    """The records of some datasets as (dataset, record) items: those to train on, and the
    held-out ones of each dataset (every holdout-th episode)."""
    train, held = [], []
    for p in paths:
        ds = data.Dataset(p, image_size=image_size)
        recs = [r for r in read(ds.path / "etc.jsonl") if r["level"] in levels]
        train += [(ds, r) for r in recs if not held_out(r, holdout)]
        held.append([(ds, r) for r in recs if held_out(r, holdout)])
    return train, held

# --- Prompts, samples and scores --------------------------------------------------------------
def prompt(question: str) -> str:
    return f"question: {question}\nanswer:"  # data.collate puts the space before the answer

def goal_question(instruction: str) -> str:  # also what eval.py grounding asks the VLM on a layout's first frame
    return f"where is the goal of: {instruction}?"

def ask_goal(action_sample: dict, answer: str | None = None) -> dict:
    """The goal step (VLAConfig.goal_step, pi0.5's high-level step): the action prompt becomes the
    goal question of its instruction, answered by the goal's pixel (training: the true one, from
    data.ActionSamples' goal, as teacher forcing) or by the VLM's own answer (the policy):
        text = "question: where is the goal of: reach the blue marker?\nanswer:", answer = "blue 31 17"
    (push: "puck 30 40 blue 31 17", etc.goal_answer).
    The expert reads question and answer; the VLM learns to write the answer (next-token loss)."""
    s = {k: v for k, v in action_sample.items() if k != "goal"}
    if answer is None:
        answer = goal_answer(**action_sample["goal"])
    return s | dict(text=prompt(goal_question(s["text"].strip())), answer=answer)

class GoalSteps:
    """data.ActionSamples with the goal step (VLAConfig.goal_step) taken, for data.Batches."""
    def __init__(self, actions: data.ActionSamples):
        self.actions = actions

    def __len__(self):
        return len(self.actions)

    def __call__(self, j: int, rng: np.random.Generator) -> dict:
        return ask_goal(self.actions(j, rng))

def sample(ds: data.Dataset, rec: dict) -> dict:
    """An ETC record with its frame's image; the answer is what the loss is taken on."""
    return dict(image=np.asarray(ds.arrays[rec["task"]]["images"][rec["frame"]]), text=prompt(rec["question"]), answer=rec["answer"])

class Samples:
    """(dataset, record) items as samples for data.Batches, which mixes them by `levels` and `kinds`."""
    def __init__(self, items: list[tuple[data.Dataset, dict]]):
        self.items, self.levels, self.kinds = items, [r["level"] for _, r in items], [r["kind"] for _, r in items]

    def __len__(self):
        return len(self.items)

    def __call__(self, j: int) -> dict:
        return sample(*self.items[j])

def error(kind: str, pred: str, answer: str) -> float:
    """Coordinates: mean pixel distance between predicted and true points (inf if the
    shapes differ). Words: 0 for an exact match, inf otherwise."""
    if kind not in COORDS:
        return 0.0 if pred.strip() == answer else math.inf
    got, want = (np.array([float(x) for x in re.findall(r"\d+", t)]) for t in (pred, answer))  # float: '99..9' too
    if got.shape != want.shape:
        return math.inf
    return float(np.linalg.norm((got - want).reshape(-1, 2), axis=1).mean())

def scores(recs: list[dict], preds: list[str], tol: float = 4.0, by: str = "level") -> dict:
    """Per level (or per kind, by='kind'): accuracy (exact words; coordinates within `tol` px) and
    the median pixel error of the coordinate answers that have the right shape."""
    out = {}
    for lv in (LEVELS if by == "level" else sorted({r["kind"] for r in recs})):
        pairs = [(r, p) for r, p in zip(recs, preds) if r[by] == lv]
        if pairs:
            errs = [error(r["kind"], p, r["answer"]) for r, p in pairs]
            px = [e for (r, _), e in zip(pairs, errs) if r["kind"] in COORDS and e < math.inf]
            out[lv] = dict(acc=float(np.mean([e <= tol for e in errs])), n=len(pairs),
                           px_err=float(np.median(px)) if px else None)  # of answers that parsed
    return out

# The questions' and answers' words: with every instruction, the tiny tokenizer's corpus.
WORDS = ("question: where is the gripper?\nanswer:", "locate the goal", "is the gripper open or closed?",
         "what colour is the", "where should the gripper act to", "what is the next step to",
         "is the task done: yes no", "predict the trajectory of:", "where is the gripper relative to the",
         "left, right, aligned, above, below, level, in front, behind", "where does the gripper move next?",
         "stay up down toward the camera away from the camera and close open the gripper",
         "where is the blue marker?", "what colour is the marker nearest the gripper?", "where is the goal of:")

def corpus() -> list[str]:
    """Every text the policy reads or writes: instructions in every colour, ETC words.
    model.tiny_tokenizer learns its merges from it, so prompts stay short."""
    texts = [t for task in sim.TASKS for c in [None, *sim.PALETTE] for t in sim.instructions(task, c, "all")]
    texts += [t for task in sim.MARKER_TEXT for m in sim.PALETTE for t in sim.instructions(task, None, "all", marker=m)]
    return texts + list(WORDS) + list(PHASES)  # numbers: model.tiny_tokenizer makes each one token itself

if __name__ == "__main__":
    data.cli(write, Etc)
