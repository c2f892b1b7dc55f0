"""Closed loop with an oracle goal step: the true goal (and puck) pixel written in place of the VLM's answer.
Separates the expert's execution from the VLM's binding. argv: ckpt task n.
From the repository root (docs/notes.md): python docs/scratch/oracle.py out/stage2 reach 20"""
import sys
import numpy as np, torch
sys.path.insert(0, ".")
import data, model, scaffold, sim, etc
ckpt, task, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(2)
vla = model.load(ckpt).eval()
var = sim.Variation(**data.Dataset("data/source").meta["variation"])
world = sim.World(task, 64, var)
state = {}
def oracle(vla_, samples, **k):
    named = state["named"]
    px = np.clip(world.project(world.markers), 0, 63)
    obj = np.clip(world.project(world.objects()[:1])[0], 0, 63) if task == "push" else None
    return [etc.goal_answer(task, world.marker_words[named], px[named], obj)] * len(samples)
scaffold.answers = oracle
pol = scaffold.policy(vla)
wins = []
for seed in data.eval_seeds(task, 0, n):
    world.seed(seed)
    text, state["named"] = world.instruction("right")
    success = False
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        while world.steps < 200 and not success:
            chunk = pol(world.render(), text, world.proprio())
            for a in chunk[:8]:
                success = world.step(a) or success
                if success or world.steps >= 200: break
    wins.append(success)
    print(seed, success, world.nearest_marker() in world.goals(), round(float(world.distances()[world.goals()].min()), 3), world.steps, flush=True)
print(task, "oracle-goal success", np.mean(wins), len(wins))
