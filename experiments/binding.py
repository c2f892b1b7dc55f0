"""The binding benchmark: how fast does a fresh VLM learn to fetch what a word names? Learning curves.

    python experiments/binding.py --probe text     # places listed in the prompt ("green 12 40, blue 31 17, ..."), a blank image
    python experiments/binding.py --probe text --vlm smolvlm-256m-lm --no-image --batch 8 --lr 1e-4   # a pretrained tower
    python experiments/binding.py --probe discs    # K flat discs of palette colours on grey: "where is the blue disc?"
    python experiments/binding.py --probe world    # the grounded world's frames: "where is the blue marker?" (data/scenes)
    python experiments/run.py binding              # every probe with the defaults and the ablations -> results/binding/

Binding is the VLM's part of following an instruction: the colour word has to fetch the place of
the marker it names (associative recall). Each probe trains a fresh model.VLA's VLM on one question,
through the project's own tokenizer, data.collate and next-token loss, and every --eval-every steps
asks --held held-out samples (greedy decoding). `named` is how often the answer's nearest place is the
asked one (chance 1/K), `px4` how often the answer lies within 4 px of it. Written to --out:

    {"probe": "discs", "config": {...}, "curve": [{"step": 0, "named": 0.33, ...}, {"step": 250, "named": 0.34, "px4": 0.02, "chance": 0.33, "loss": 2.6}, ...]}

(the world probe also records "layouts": how many training and held-out scenes the curve comes from)

Any VLM goes through it (--vlm: a preset or a checkpoint folder); ablations are flags (--embed-std
0.02 is transformers' own initialisation, --vision-lr 0.1 trains the vision tower at a tenth of the rate,
--one-first 1000 shows one disc per image for the first 1,000 steps: locating before naming).
"""
import json, re, sys, time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np, torch, tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data, etc, model, scaffold, sim  # noqa: E402

COLORS = sim.Variation().marker_colors  # the grounded world's six marker colours


@dataclass
class Config:
    probe: Literal["text", "discs", "world"] = "discs"
    vlm: str = "tiny"  # the VLM trained: "tiny", a preset or a checkpoint folder
    image: bool = True  # text: --no-image leaves the image out, the language model alone (a real-size vision tower is most of a step)
    markers: int = 3  # K places per sample (text, discs)
    mix: bool = False  # train on 1 to K discs per sample (a single disc teaches locating); held-out samples have K
    one_first: int = 0  # discs: the first N steps train on one disc per image (locating alone, a curriculum phase), then K
    radius: float = 4.5  # disc radius in pixels (a grounded-world marker is ~9 px wide at 64 px)
    steps: int = 3000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    vision_lr: float = 1.0  # the vision tower's learning rate, as a fraction of --lr (scaffold.param_groups)
    embed_std: float = 1.0  # a VLM built from scratch: std of its token embeddings (model.VLAConfig)
    patch: int = model.VLAConfig.patch  # the tiny tower's patch side in px: 8 gives 64 image tokens at 64 px, 16 gives 16
    eval_every: int = 250
    held: int = 200  # held-out samples asked at each evaluation
    data: tuple[str, ...] = ("data/scenes",)  # world: datasets whose marker questions are asked (etc.jsonl)
    holdout: int = 10  # world: every holdout-th episode's questions are the held-out ones (as in training)
    seed: int = 0  # fixes the model's initialisation and every sample
    threads: int = 1  # torch threads (two runs share 2 cores)
    out: str = "results/binding/discs.json"


# --- The probes: a sample is (collate's dict, the K places (K, 2), the asked one's index) --------
def text_sample(cfg: Config, rng: np.random.Generator) -> tuple[dict, np.ndarray, int]:
    """K colours with a place each, listed in the prompt in random order; one of them asked."""
    words = rng.choice(COLORS, cfg.markers, replace=False)
    places = rng.integers(0, 64, (cfg.markers, 2))
    q = int(rng.integers(cfg.markers))
    listing = ", ".join(f"{w} {x} {y}" for w, (x, y) in zip(words, places))
    text = etc.prompt(f"markers: {listing}. where is the {words[q]} marker?")
    image = dict(image=np.full((64, 64, 3), 128, np.uint8)) if cfg.image else {}
    return dict(**image, text=text, answer=etc.named_pt(words[q], places[q])), places, q


def disc_sample(cfg: Config, rng: np.random.Generator, k: int) -> tuple[dict, np.ndarray, int]:
    """k flat discs of distinct marker colours on grey, centres >= 12 px apart; one asked by colour."""
    while True:
        places = rng.integers(6, 58, (k, 2))
        if all(np.linalg.norm(places[i] - places[j]) >= 12 for i in range(k) for j in range(i)):
            break
    words = rng.choice(COLORS, k, replace=False)
    image = np.full((64, 64, 3), 128, np.uint8)
    v, u = np.mgrid[0:64, 0:64]
    for w, (x, y) in zip(words, places):
        image[(u - x) ** 2 + (v - y) ** 2 <= cfg.radius ** 2] = np.round(255 * np.array(sim.PALETTE[w]))
    q = int(rng.integers(k))
    return dict(image=image, text=etc.prompt(f"where is the {words[q]} disc?"), answer=etc.named_pt(words[q], places[q])), places, q


class World:
    """The grounded world's "where is the <colour> marker?" records: training ones and held-out ones
    (every etc.held_out episode), each with its frame's marker places."""
    def __init__(self, paths: tuple[str, ...], holdout: int):
        self.train, self.held = [], []
        for p in paths:
            ds = data.Dataset(p)
            for r in etc.read(ds.path / "etc.jsonl"):
                if r["kind"] == "marker":
                    (self.held if etc.held_out(r, holdout) else self.train).append((ds, r))
        if not self.train or not self.held:
            raise data.DataError(f"no marker questions in {paths}: collect with --variation.markers 3 and run etc.py")
        layouts = lambda items: len({(str(ds.path), r["task"], r["episode"]) for ds, r in items})  # noqa: E731
        self.layouts = dict(train=layouts(self.train), held=layouts(self.held))  # what the curve generalises from

    def sample(self, item: tuple) -> tuple[dict, np.ndarray, int]:
        ds, r = item
        places = np.asarray(ds.arrays[r["task"]]["markers_px"][r["frame"]])  # (K, 2)
        asked = np.array([float(x) for x in re.findall(r"\d+", r["answer"])])  # "blue 31 17" -> (31, 17)
        return etc.sample(ds, r), places, int(np.linalg.norm(places - asked, axis=1).argmin())


def sampler(cfg: Config):
    """(train(rng, step) -> sample, held-out samples, what to record of the data) of the probe."""
    if cfg.probe == "world":
        world = World(cfg.data, cfg.holdout)
        held = [world.sample(world.held[i]) for i in np.linspace(0, len(world.held) - 1, cfg.held).astype(int)]
        return lambda rng, step: world.sample(world.train[rng.integers(len(world.train))]), held, dict(layouts=world.layouts)
    held = np.random.default_rng([cfg.seed, 1])  # held-out samples: a stream the training draws never reach
    if cfg.probe == "text":
        return lambda rng, step: text_sample(cfg, rng), [text_sample(cfg, held) for _ in range(cfg.held)], {}

    def k(rng, step):  # how many discs a training sample shows: one in the first phase, then K (or 1 to K with --mix)
        return 1 if step < cfg.one_first else int(rng.integers(1, cfg.markers + 1)) if cfg.mix else cfg.markers
    return lambda rng, step: disc_sample(cfg, rng, k(rng, step)), [disc_sample(cfg, held, cfg.markers) for _ in range(cfg.held)], {}


# --- Scoring and the loop ------------------------------------------------------------------------
def score(answers: list[str], held: list[tuple]) -> tuple[float, float]:
    """(named, px4): the answer's nearest place is the asked one / within 4 px of it (no point: neither)."""
    named = px4 = 0
    for a, (_, places, q) in zip(answers, held):
        uv = [float(x) for x in re.findall(r"\d+", a)[:2]]
        if len(uv) == 2:
            d = np.linalg.norm(places - np.array(uv), axis=1)
            named, px4 = named + (d.argmin() == q), px4 + (d[q] <= 4)
    return named / len(held), px4 / len(held)


def main(cfg: Config) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    extra = [etc.prompt(f"where is the {w} disc?") for w in COLORS]  # the disc probe's words, for the tokenizer
    if not cfg.image and cfg.probe != "text":
        raise data.DataError(f"--no-image is for the text probe (the {cfg.probe} probe asks about the image)")
    vla = model.VLA(model.VLAConfig(vlm=cfg.vlm, embed_std=cfg.embed_std, patch=cfg.patch), corpus=etc.corpus() + extra)
    vla.image_ids = vla.image_ids if cfg.image else []  # no image tokens in the prompt (collate, answers)
    train, held, about = sampler(cfg)
    questions = [{k: v for k, v in s.items() if k != "answer"} for s, _, _ in held]
    opt = torch.optim.AdamW(scaffold.param_groups(vla, cfg.vision_lr, skip="expert."), lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=0.01)
    curve, t0 = [], time.perf_counter()

    def record(step: int, **loss):  # the held-out rates after `step` updates (0: what the VLM brings)
        named, px4 = score(scaffold.answers(vla, questions, max_new=10), held)  # SmolLM2 writes a digit per token
        curve.append(dict(step=step, named=named, px4=px4, chance=1 / len(held[0][1]), **loss))
        print(" ".join(f"{k} {v:.3g}" for k, v in curve[-1].items()), f"({time.perf_counter() - t0:.0f} s)", flush=True)
    record(0)
    for step in range(cfg.steps):
        scaffold.set_lr(opt, scaffold.lr_at(step, cfg.lr, cfg.warmup, cfg.steps))
        rng = np.random.default_rng([cfg.seed, 0, step])  # batch `step` is the same in every run of this seed
        batch = data.collate([train(rng, step)[0] for _ in range(cfg.batch)], vla.tokenizer, vla.image_ids)
        loss, logs = model.global_loss(vla(etc=batch), {"lm": 1.0})
        scaffold.update(opt, loss, 1.0)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record(step + 1, loss=round(logs["lm"], 4))
    result = dict(probe=cfg.probe, config=asdict(cfg), **about, curve=curve, wall_s=round(time.perf_counter() - t0),
                  code=scaffold.commit())
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    data.cli(main, Config)
