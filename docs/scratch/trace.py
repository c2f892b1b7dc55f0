"""Closed-loop trace of the goal step: per chunk, which marker the VLM's answer is nearest, vs the named one.
From the repository root (docs/notes.md): python docs/scratch/trace.py out/stage2 reach 20"""
import sys, json, re
from functools import partial
import numpy as np, torch
sys.path.insert(0, ".")
import data, model, scaffold, sim, etc
ckpt, task, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
vla = model.load(ckpt).eval()
ds = data.Dataset("data/source")
var = sim.Variation(**ds.meta["variation"])
said = []
real = scaffold.answers
scaffold.answers = lambda *a, **k: said.append(real(*a, **k)) or said[-1]
pol = scaffold.policy(vla)
world = sim.World(task, 64, var)
rows = []
for seed in data.eval_seeds(task, 0, n):
    world.seed(seed)
    text, named = world.instruction("right")
    said.clear(); picks = []; success = False
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        while world.steps < 200 and not success:
            img = world.render()
            mpx = world.project(world.markers)
            chunk = pol(img, text, world.proprio())
            uv = [float(x) for x in re.findall(r"\d+", said[-1][0])][-2:]
            picks.append(int(np.linalg.norm(mpx - uv, axis=1).argmin()) if len(uv) == 2 else -1)
            for a in chunk[:8]:
                success = world.step(a) or success
                if success or world.steps >= 200: break
    end = world.nearest_marker()
    goals = world.goals()
    rows.append(dict(seed=seed, success=success, named=named, end=end, goals=goals, picks=picks, first=said[0][0] if said else None))
    print(json.dumps(rows[-1]), flush=True)
frac = [np.mean([p in r["goals"] for p in r["picks"]]) for r in rows]
print("success", np.mean([r["success"] for r in rows]), "first pick right", np.mean([r["picks"][0] in r["goals"] for r in rows]),
      "mean frac picks right", np.mean(frac), "episodes all-right", np.mean([f == 1 for f in frac]))
