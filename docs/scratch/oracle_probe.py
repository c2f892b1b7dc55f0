"""eval.py grounding with an oracle goal step: each text's goal answer is the true pixel of the marker its colour word
names (push: the puck's first), so 'named' measures how often the expert's first chunk goes where it is told.
From the repository root (docs/notes.md): python docs/scratch/oracle_probe.py eval.py grounding --ckpt out/stage2 --data data/source --tasks reach"""
import re, runpy, sys
import numpy as np
sys.path.insert(0, ".")
import etc, scaffold, sim
worlds = []
init = sim.World.__init__
def keep(self, *a, **k):
    init(self, *a, **k); worlds.append(self)
sim.World.__init__ = keep
def oracle(vla, samples, **k):
    w = worlds[-1]
    px = np.clip(w.project(w.markers), 0, w.size - 1)
    obj = np.clip(w.project(w.objects()[:1])[0], 0, w.size - 1) if w.task == "push" else None
    out = []
    for s in samples:
        j = next(i for i, word in enumerate(w.marker_words) if re.search(rf"\b{word}\b", s["text"]))
        out.append(etc.goal_answer(w.task, w.marker_words[j], px[j], obj))
    return out
scaffold.answers = oracle
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
