"""Speed, measured and printed (never asserted): collection frames/s, and the VLA's training
step and sampling latency beside transformers' PI0ForConditionalGeneration at matched size.

    python bench.py              # everything
    python bench.py --quick      # a smoke run for CI
    python bench.py --only model # one section: collect | model

Every number in the printed table comes from this run on this machine.
"""
import multiprocessing as mp
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import tyro

import data
import model
import sim


@dataclass
class Bench:
    quick: bool = False  # a few episodes only: checks that the benchmark runs
    tasks: tuple[str, ...] = ("reach", "push", "drawer-open", "button-press-topdown")
    episodes: int = 6  # scripted episodes per task and setting
    sizes: tuple[int, ...] = (64, 84)  # image sizes to time
    workers: tuple[int, ...] = (1, 2)  # process counts to time
    only: str = ""  # run one section: collect | model
    batch: int = 16  # training batch for the model section
    repeats: int = 10  # timed repetitions (median reported)


def pi0_peer(vla: model.VLA, image_size: int | None = None):
    """transformers' PI0ForConditionalGeneration at about this VLA's size and shapes: the
    peer that bench.py times and the tests check the flow-matching convention against.
    PaliGemma's SigLIP has no pixel shuffle, so at the same patch size it sees 4x the image
    tokens (64 at 64 px) that Idefics3 does (16); image_size=32 matches the token count."""
    from transformers import PI0Config, PI0ForConditionalGeneration
    c, tc = vla.cfg, vla.vlm.config.text_config
    vision = vla.vlm.config.vision_config
    head_dim = tc.hidden_size // tc.num_attention_heads
    cfg = PI0Config(
        vlm_config=dict(model_type="paligemma", image_token_id=vla.vlm.config.image_token_id, projection_dim=tc.hidden_size,
                        text_config=dict(model_type="gemma", hidden_size=tc.hidden_size, num_hidden_layers=tc.num_hidden_layers,
                                         intermediate_size=tc.intermediate_size, num_attention_heads=tc.num_attention_heads,
                                         num_key_value_heads=1, head_dim=head_dim, vocab_size=tc.vocab_size),
                        vision_config=dict(model_type="siglip_vision_model", hidden_size=vision.hidden_size,
                                           intermediate_size=vision.intermediate_size, patch_size=vision.patch_size,
                                           image_size=image_size or vision.image_size, num_hidden_layers=vision.num_hidden_layers,
                                           num_attention_heads=vision.num_attention_heads, vision_use_head=False)),
        dit_config=dict(model_type="gemma", hidden_size=c.expert_width, num_hidden_layers=tc.num_hidden_layers,
                        intermediate_size=2 * c.expert_mlp, num_attention_heads=c.expert_heads,
                        num_key_value_heads=1, head_dim=head_dim),
        chunk_size=c.chunk, max_state_dim=c.proprio_dim, max_action_dim=c.action_dim)
    return PI0ForConditionalGeneration(cfg)


def collection_rate(tasks: list[str], episodes: int, size: int, workers: int) -> tuple[int, float]:
    """(frames, seconds) for scripted episodes in `workers` warm processes (start-up excluded)."""
    jobs = [(t, data.episode_seed(0, t, k), size, sim.Variation(), False, 300, 8)
            for t in tasks for k in range(episodes)]
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(data.run_episode, jobs[:workers], chunksize=1)  # imports, GL contexts
        t0 = time.perf_counter()
        eps = pool.map(data.run_episode, jobs, chunksize=1)
        seconds = time.perf_counter() - t0
    return sum(len(e["images"]) for e in eps if e is not None), seconds


def bench_collection(cfg: Bench) -> list[str]:
    tasks = list(cfg.tasks[:1] if cfg.quick else cfg.tasks)
    episodes = 1 if cfg.quick else cfg.episodes
    rows = ["| image px | workers | frames | s | frames/s total | frames/s per worker | scaling vs 1 worker |",
            "|---|---|---|---|---|---|---|"]
    for size in cfg.sizes:
        base = None
        for w in cfg.workers:
            frames, s = collection_rate(tasks, episodes, size, w)
            rate = frames / s
            base = base or rate
            rows.append(f"| {size} | {w} | {frames} | {s:.1f} | {rate:.0f} | {rate / w:.0f} | {rate / base:.2f}x |")
    return rows


def median_ms(fn, repeats: int) -> float:
    """Median wall time of fn() in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def bench_model(cfg: Bench) -> list[str]:
    """Our tiny VLA vs transformers' PI0 at matched size, same batch and prompt text. The
    peer runs twice: on our 64 px images (64 image tokens, no pixel shuffle) and on 32 px
    images (16 image tokens, as many as ours)."""
    torch.manual_seed(0)
    vla = model.VLA(model.VLAConfig())
    B, reps = (2, 2) if cfg.quick else (cfg.batch, cfg.repeats)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(1, 255, (B, 64, 64, 3), dtype=np.uint8))
    text = ["push the puck to the goal\n"] * B  # a typical instruction
    batch = vla.batch_from(images, text, torch.randn(B, 4))
    batch["actions"], batch["action_mask"] = torch.randn(B, 8, 4), torch.ones(B, 8, dtype=torch.bool)
    prompt = vla.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]

    def timings(m, loss_fn, sample_fn):
        """(train step ms, 10-step sample ms, 1-step sample ms) for a model."""
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn().backward()
            opt.step()
        m.train()
        train = median_ms(step, reps)
        m.eval()
        with torch.no_grad():
            return train, median_ms(lambda: sample_fn(10), reps), median_ms(lambda: sample_fn(1), reps)

    one = {k: v[:1] for k, v in batch.items()}
    ours = timings(vla, lambda: vla.loss(batch)["loss"], lambda n: vla.sample(one, n))
    cols, heads = [ours], [f"ours ({batch['input_ids'].shape[1]} prefix tokens)"]
    for size in (64, 32):
        peer = pi0_peer(vla, image_size=size)
        vc = peer.config.vlm_config
        n_img = (size // vc.vision_config.patch_size) ** 2
        ids = torch.cat([torch.full((B, n_img), vc.image_token_id), prompt], 1)
        pixels = torch.nn.functional.interpolate(vla.pixels(images)[:, 0], size=(size, size))[:, None]
        pin = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                   pixel_attention_mask=torch.ones(B, 1, dtype=torch.bool), state=batch["proprio"])
        pone = {k: v[:1] for k, v in pin.items()}
        cols.append(timings(peer, lambda: peer(actions=batch["actions"], **pin).loss,
                            lambda n: peer.sample_actions(num_steps=n, **pone)))
        heads.append(f"PI0 {size} px ({ids.shape[1]} prefix tokens)")
    n = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    rows = [f"parameters: ours {n(vla):.2f}M (VLM {n(vla.vlm):.2f}M + expert {n(vla.expert):.2f}M), "
            f"PI0 peer {n(peer):.2f}M; torch threads {torch.get_num_threads()}", "",
            "| measure | " + " | ".join(heads) + " | ours / PI0 64 px | ours / PI0 32 px |",
            "|---|---|---|---|---|---|"]
    names = [f"train step, batch {B} (ms)", "sample 1 chunk, 10 steps (ms)", "sample 1 chunk, 1 step (ms)"]
    for i, name in enumerate(names):
        vals = [c[i] for c in cols]
        rows.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in vals) +
                    f" | {vals[0] / vals[1]:.2f} | {vals[0] / vals[2]:.2f} |")
    rows.append(f"| train samples/s | " + " | ".join(f"{1000 * B / c[0]:.0f}" for c in cols) + " | | |")
    return rows


def main(cfg: Bench):
    print(f"machine: {os.cpu_count()} cores, MUJOCO_GL={os.environ.get('MUJOCO_GL')}, "
          f"torch {torch.__version__}, numpy {np.__version__}")
    if cfg.only in ("", "collect"):
        print("\n## Collection (scripted experts, rendering included)\n")
        print("\n".join(bench_collection(cfg)))
    if cfg.only in ("", "model"):
        print("\n## The VLA (tiny, CPU) vs transformers' PI0ForConditionalGeneration\n")
        print("\n".join(bench_model(cfg)))


if __name__ == "__main__":
    main(tyro.cli(Bench))
