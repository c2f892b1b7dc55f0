"""Speed, measured and printed (never asserted): collection frames/s for now.

    python bench.py              # full: 64 and 84 px, 1 and 2 workers
    python bench.py --quick      # a smoke run for CI

Every number in the printed table comes from this run on this machine.
"""
import multiprocessing as mp
import os
import time
from dataclasses import dataclass

import numpy as np
import tyro

import data
import sim


@dataclass
class Bench:
    quick: bool = False  # a few episodes only: checks that the benchmark runs
    tasks: tuple[str, ...] = ("reach", "push", "drawer-open", "button-press-topdown")
    episodes: int = 6  # scripted episodes per task and setting
    sizes: tuple[int, ...] = (64, 84)  # image sizes to time
    workers: tuple[int, ...] = (1, 2)  # process counts to time


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


def main(cfg: Bench):
    print(f"machine: {os.cpu_count()} cores, MUJOCO_GL={os.environ.get('MUJOCO_GL')}, "
          f"numpy {np.__version__}")
    print("\n## Collection (scripted experts, rendering included)\n")
    print("\n".join(bench_collection(cfg)))


if __name__ == "__main__":
    main(tyro.cli(Bench))
