"""Speed, measured and printed, never asserted: collection, training and MFU, latency, a PI0 peer.

    python bench.py                 # everything, measured in this run; also writes out/bench.md
    python bench.py --quick         # a smoke run (CI)
    python bench.py --only latency  # one section: collect | model | training | latency
    python bench.py --size smolvlm-256m  # a real-size VLA (random weights, offline) on this machine's device
"""
import dataclasses, multiprocessing as mp, os, resource, sys, time
from dataclasses import dataclass
from pathlib import Path

import numpy as np, torch, tyro

import model  # sim, data and etc are imported where needed: `import bench` (pi0_peer, for the model tests) starts no MuJoCo

@dataclass
class Bench:
    quick: bool = False  # a few episodes only: checks that the benchmark runs
    tasks: tuple[str, ...] = ("reach", "push", "drawer-open", "button-press-topdown")
    episodes: int = 6  # scripted episodes per task and setting
    sizes: tuple[int, ...] = (64, 84)  # image sizes to time
    workers: tuple[int, ...] = (1, 2)  # process counts to time
    only: str = ""  # run one section: collect | model | training | latency
    batch: int = 16  # training batch for the model section
    repeats: int = 10  # timed repetitions (median reported)
    teacher: str = "out/stage3"  # latency: checkpoints to time (the tiny random VLA stands in for a missing one)
    students: tuple[str, ...] = ("out/sdm", "out/cd")
    out: str | None = "out/bench.md"  # the tables as markdown (None: print only)
    size: str = "tiny"  # a --vlm preset (smolvlm-256m, smolvlm-500m) or VLM folder: time that size only
    device: str = "auto"  # real size: auto (CUDA if present) | cpu | cuda
    dtype: str = "auto"  # real size: bf16 autocast; auto = on CUDA only
    compile: bool = False  # real size: also time inference through VLA.compile_inference (CUDA graphs on a GPU), beside eager

def millions(m: torch.nn.Module) -> float:
    return sum(p.numel() for p in m.parameters()) / 1e6

def pi0_peer(vla: model.VLA):
    """transformers' PI0ForConditionalGeneration at about this VLA's size: the timed peer, and the
    tests' check of our flow convention. Like our tiny tower it has no pixel shuffle: as many image tokens."""
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
                                           image_size=vision.image_size, num_hidden_layers=vision.num_hidden_layers,
                                           num_attention_heads=vision.num_attention_heads, vision_use_head=False)),
        dit_config=dict(model_type="gemma", hidden_size=c.expert_width, num_hidden_layers=tc.num_hidden_layers,
                        intermediate_size=2 * c.expert_mlp, num_attention_heads=c.expert_heads,
                        num_key_value_heads=1, head_dim=head_dim),
        chunk_size=c.chunk, max_state_dim=c.proprio_dim, max_action_dim=c.action_dim)
    return PI0ForConditionalGeneration(cfg)

def tiny_vla() -> model.VLA:
    """The default tiny VLA, its tokenizer trained on the project's texts as in training."""
    import etc
    torch.manual_seed(0)
    return model.VLA(model.VLAConfig(), corpus=etc.corpus())

def observations(vla: model.VLA, images: torch.Tensor, texts: list[str], proprio=None, answers=None,
                 chunk: int = 0) -> dict:
    """A collated batch, as training and the policy make it (tokenising included); with
    chunk > 0 also random normalised action chunks of that length, none padded."""
    import data
    samples = [dict(image=im, text=t) for im, t in zip(images.numpy(), texts)]
    for i, s in enumerate(samples):
        s.update({} if proprio is None else dict(proprio=proprio[i].numpy()), **({} if answers is None else dict(answer=answers[i])))
    batch = data.collate(samples, vla.tokenizer, vla.image_ids)
    if chunk:
        batch.update(actions=torch.randn(len(texts), chunk, 4), action_mask=torch.ones(len(texts), chunk, dtype=torch.bool))
    return batch

def random_images(n: int, size: int = 64) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(1, 255, (n, size, size, 3), dtype=np.uint8))

def collection_rate(tasks: list[str], episodes: int, size: int, workers: int) -> tuple[int, float]:
    """(frames, seconds) for scripted episodes in `workers` warm processes (start-up excluded)."""
    import data
    jobs = [data.episode_job(data.Collect(image_size=size), t, k) for t in tasks for k in range(episodes)]
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(data.run_episode, jobs[:workers], chunksize=1)  # imports, GL contexts
        t0 = time.perf_counter()
        eps = pool.map(data.run_episode, jobs, chunksize=1)
        seconds = time.perf_counter() - t0
    return sum(len(e["images"]) for e in eps if e is not None), seconds

def bench_collection(cfg: Bench) -> list[str]:
    tasks, episodes = (cfg.tasks[:1], 1) if cfg.quick else (cfg.tasks, cfg.episodes)
    rows = ["| image px | workers | frames | s | frames/s total | frames/s per worker | scaling vs 1 worker |",
            "|---|---|---|---|---|---|---|"]
    for size in cfg.sizes:
        base = None
        for w in cfg.workers:
            frames, s = collection_rate(list(tasks), episodes, size, w)
            base = base or frames / s
            rows.append(f"| {size} | {w} | {frames} | {s:.1f} | {frames / s:.0f} | {frames / s / w:.0f} | {frames / s / base:.2f}x |")
    return rows

def median_ms(fn, repeats: int) -> float:
    """Median wall time of fn() in ms, after one warm-up call (CUDA work waited for)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))

def train_step(m: torch.nn.Module, loss_fn):
    """One AdamW step of `m` on loss_fn(), as a function to time."""
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
    return step

def interleaved_ms(fns: list, repeats: int) -> list[float]:
    """Median wall time (ms) of each fn, timed in turns (one warm-up each, then `repeats`
    rounds of every fn once), so drift in the machine's speed hits every column alike."""
    times = [[] for _ in fns]
    for r in range(repeats + 1):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0) if r else None
    return [1000 * float(np.median(t)) for t in times]

def bench_model(cfg: Bench) -> list[str]:
    """Our tiny VLA vs transformers' PI0 at matched size (as many image tokens), same batch, images
    and prompt text, timed in turns; then where the step goes."""
    vla, (B, reps) = tiny_vla(), ((2, 2) if cfg.quick else (cfg.batch, 3 * cfg.repeats))
    images, text = random_images(B), ["push the puck to the goal\n"] * B  # a typical instruction
    batch = observations(vla, images, text, torch.randn(B, 4), chunk=8)
    prompt = vla.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    one = {k: v[:1] for k, v in batch.items()}
    losses, samplers = [lambda: vla.loss(batch)["loss"]], [lambda n: vla.eval().sample(one, n)]
    peer = pi0_peer(vla)
    ids = torch.cat([torch.full((B, len(vla.image_ids)), peer.config.vlm_config.image_token_id), prompt], 1)
    pin = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=model.pixels(vla.vlm, images),
               pixel_attention_mask=torch.ones(B, 1, dtype=torch.bool), state=batch["proprio"])
    pone = {k: v[:1] for k, v in pin.items()}
    losses.append(lambda: peer(actions=batch["actions"], **pin).loss)
    samplers.append(lambda n: peer.eval().sample_actions(num_steps=n, **pone))
    heads = [f"ours ({batch['input_ids'].shape[1]} prefix tokens)", f"PI0 ({ids.shape[1]} prefix tokens)"]
    train = interleaved_ms([train_step(m.train(), f) for m, f in zip((vla, peer), losses)], reps)
    forward = interleaved_ms(losses, reps)  # the rest of a step: backward + AdamW
    with torch.no_grad():
        cols = list(zip(train, *(interleaved_ms([lambda f=f: f(k) for f in samplers], reps) for k in (10, 1))))
    parts = [forward_ms(vla, dict(vision=vla.vlm.model.vision_model, text=vla.vlm.model.text_model, head=vla.expert), losses[0], reps),
             forward_ms(peer, dict(vision=peer.model.vlm.vision_tower, text=peer.model.vlm.language_model, head=peer.model.dit), losses[1], reps)]
    rows = [f"parameters: ours {millions(vla):.2f}M (VLM {millions(vla.vlm):.2f}M + expert {millions(vla.expert):.2f}M), "
            f"PI0 peer {millions(peer):.2f}M; torch threads {torch.get_num_threads()}; median of {reps} turns", "",
            "| measure | " + " | ".join(heads) + " | ours / PI0 |", "|---|---|---|---|"]
    for i, name in enumerate([f"train step, batch {B} (ms)", "sample 1 chunk, 10 steps (ms)", "sample 1 chunk, 1 step (ms)"]):
        v = [c[i] for c in cols]
        rows.append(f"| {name} | " + " | ".join(f"{x:.1f}" for x in v) + f" | {v[0] / v[1]:.2f} |")
    rows.append("| train samples/s | " + " | ".join(f"{1000 * B / c[0]:.0f}" for c in cols) + " | |")
    vs = lambda k: " vs ".join(f"{p[k]:.1f}" for p in parts)  # noqa: E731
    rows += ["", f"Where the step goes, ours vs PI0 (ms): forward {forward[0]:.1f} vs {forward[1]:.1f}, backward + "
             f"AdamW {train[0] - forward[0]:.1f} vs {train[1] - forward[1]:.1f}; within the forward, vision tower {vs('vision')}, "
             f"language model {vs('text')}, action expert {vs('head')}."]
    return rows

def forward_ms(m: torch.nn.Module, parts: dict, fn, repeats: int) -> dict:
    """Median forward time (ms) of each named submodule over repeats calls of fn(), by hooks."""
    times, start = {k: [] for k in parts}, {}
    hooks = [h for k, mod in parts.items() for h in (
        mod.register_forward_pre_hook(lambda *_, k=k: start.__setitem__(k, time.perf_counter())),
        mod.register_forward_hook(lambda *_, k=k: times[k].append(time.perf_counter() - start[k])))]
    fn()
    for k in times:
        times[k].clear()
    for _ in range(repeats):
        fn()
    for h in hooks:
        h.remove()
    return {k: 1000 * float(np.median(v)) for k, v in times.items()}

def bench_training(cfg: Bench) -> list[str]:
    """Training samples/s of a stage-2 step (half ETC, half action samples) and its model FLOP
    utilisation: FLOPs counted by torch's FlopCounterMode over one step / step time / the FLOP/s
    of a large fp32 matmul measured now (the ceiling)."""
    from torch.utils.flop_counter import FlopCounterMode
    vla, (B, reps) = tiny_vla(), ((4, 2) if cfg.quick else (32, cfg.repeats))
    images, h = random_images(B), B // 2
    etc = observations(vla, images[:h], ["question: where is the gripper?\nanswer: "] * h, answers=["31 40"] * h)
    act = observations(vla, images[h:], ["push the puck to the goal\n"] * (B - h), torch.randn(B - h, 4), chunk=8)
    step = train_step(vla, lambda: model.global_loss(vla(etc=etc, act=act), {"lm": 1.0, "flow": 1.0})[0])
    with FlopCounterMode(display=False) as counter:
        step()
    n = 512 if cfg.quick else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    flops, ms, peak = counter.get_total_flops(), median_ms(step, reps), 2 * n ** 3 / (median_ms(lambda: a @ b, reps) / 1000)
    return ["| batch | step (ms) | samples/s | GFLOP per step | achieved GFLOP/s | matmul peak GFLOP/s | MFU |",
            "|---|---|---|---|---|---|---|",
            f"| {B} | {ms:.0f} | {1000 * B / ms:.0f} | {flops / 1e9:.2f} | {flops / ms / 1e6:.1f} | {peak / 1e9:.1f} | "
            f"{flops / (ms / 1000) / peak:.1%} |"]

def bench_latency(cfg: Bench) -> list[str]:
    """Per action chunk, batch 1: the action head alone (given the prefix) and end to end (image
    + text + proprio -> chunk, tokenising included), for the teacher at 10 Euler steps, each
    student at its 1 step, and the floor: one VLM prefix pass + one expert pass, on tensors."""
    import etc

    def get(path):  # latency does not depend on the weights: a missing checkpoint is stood in for
        return (path, model.load(path)) if Path(path).is_dir() else (f"{path} (missing: tiny random VLA)", tiny_vla().eval())
    reps = 3 if cfg.quick else 5 * cfg.repeats
    t_name, teacher = get(cfg.teacher)
    image, text, proprio = random_images(1), ["push the puck to the goal\n"], torch.zeros(1, 4)
    batch = observations(teacher, image, text, proprio)
    runs = [(f"teacher {t_name}", teacher, 10)] + [(f"student {n}", m, 1) for n, m in map(get, cfg.students)]
    out = {}
    with torch.no_grad():
        for name, m, steps in runs:
            projected = m.expert.project(m.prefix(batch))
            z = torch.randn(1, m.cfg.chunk, m.cfg.action_dim)
            head = median_ms(lambda: model.euler(lambda x, t: m.expert(x, t, projected), z, steps), reps)
            out[name] = (steps, head, median_ms(lambda: m.sample(observations(m, image, text, proprio), steps), reps))
        floor = median_ms(lambda: teacher.denoise(z, torch.ones(1), teacher.prefix(batch)), reps)
        # the goal step's decode, at its longest: eos -1 never comes, so all etc.GOAL_TOKENS are written
        goal = median_ms(lambda: model.greedy(teacher.vlm, batch, etc.GOAL_TOKENS, -1, teacher.tokenizer.pad_token_id), reps)
    t_head, t_e2e = out[runs[0][0]][1:]
    rows = ["| policy | steps | head (ms) | head speed-up | end to end (ms) | end-to-end speed-up | vs floor |",
            "|---|---|---|---|---|---|---|"]
    rows += [f"| {name} | {steps} | {head:.2f} | {t_head / head:.1f}x | {e2e:.2f} | {t_e2e / e2e:.1f}x | {e2e / floor:.2f}x |"
             for name, (steps, head, e2e) in out.items()]
    return rows + [f"| floor: 1 prefix pass + 1 expert pass | 1 | | | {floor:.2f} | {t_e2e / floor:.1f}x | 1.00x |",
                   "", f"A policy with the goal step (the default) first has the VLM write the goal's pixel: {goal:.2f} ms "
                       f"per chunk on top of its end-to-end figure ({etc.GOAL_TOKENS} tokens, the most it writes; greedy, with the KV cache)."]

def saved_mb(fn) -> float:
    """MB of activations autograd keeps for backward during fn() (what checkpointing trades away)."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.shape, t.dtype)] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2 ** 20

def bench_real(cfg: Bench) -> list[str]:
    """A real-size VLA (--size: a preset's exact architecture with random weights, or a VLM folder)
    on this machine's device: parameters; latency per chunk at batch 1 (the VLM prefix, the head,
    end to end for the teacher at 10 steps and a one-step student, and the floor); a training step
    with and without gradient checkpointing: time, samples/s, memory, MFU against a matmul of
    this device measured now. Few repetitions on a CPU (each 256M step takes seconds); latency does
    not depend on the weights, so random ones time a trained policy too."""
    from torch.utils.flop_counter import FlopCounterMode
    import etc, scaffold
    proc = scaffold.start(cfg.device)
    cast, bf16 = (lambda: scaffold.autocast(proc, cfg.dtype)), scaffold.bf16(proc, cfg.dtype)
    torch.manual_seed(0)
    vla = model.VLA(model.VLAConfig(vlm=cfg.size), corpus=etc.corpus()).to(proc.device)
    B, reps = (2, 1) if cfg.quick else ((cfg.batch, cfg.repeats) if proc.cuda else (4, 2))  # seconds per CPU step
    lat_reps = 1 if cfg.quick else (5 * cfg.repeats if proc.cuda else 5)
    image, text, proprio = random_images(1), ["push the puck to the teal marker\n"], torch.zeros(1, 4)
    one = scaffold.to(observations(vla, image, text, proprio), proc.device)
    vc = vla.vlm.config.vision_config
    rows = [f"{cfg.size}: VLM {millions(vla.vlm):.1f}M + expert {millions(vla.expert):.1f}M parameters; {vc.image_size} px, "
            f"{one['input_ids'].shape[1]} prefix tokens ({vla.image_ids.count(vla.vlm.config.image_token_id)} image); "
            f"{proc.device}{' ' + torch.cuda.get_device_name() if proc.cuda else f', {torch.get_num_threads()} threads'}, "
            f"{'bf16 autocast' if bf16 else 'fp32'}; median of {lat_reps} (latency) and {reps} (training) timed runs after a warm-up",
            ""]
    vla.eval()
    with torch.no_grad(), cast():
        z = torch.randn(1, vla.cfg.chunk, vla.cfg.action_dim, device=proc.device)
        fresh = lambda: scaffold.to(observations(vla, image, text, proprio), proc.device)  # noqa: E731  (tokenising included)

        def calls(observe, step):  # the rows' calls in the order timed, through the eager modules or the compiled ones
            projected = observe(one)  # the head rows come first: a CUDA graph's next replay overwrites its outputs
            head = lambda n: model.euler(lambda x, t: step(x, t, projected), z, n)  # noqa: E731
            return {"head, 10 Euler steps": lambda: head(10), "head, 1 step": lambda: head(1),
                    "observation: VLM prefix pass + the expert's KV projection": lambda: observe(one),
                    "end to end, teacher (10 steps)": lambda: vla.sample(fresh(), 10),
                    "end to end, one-step student": lambda: vla.sample(fresh(), 1),
                    "floor: 1 observation + 1 expert step": lambda: step(z, torch.ones(1, device=proc.device), observe(one))}
        lat = {k: [median_ms(f, lat_reps)] for k, f in calls(vla.observe, vla.expert).items()}
        if cfg.compile:  # the same calls compiled; the warm-up call of each shape compiles (and captures)
            vla.compile_inference()
            for k, f in calls(*vla.compiled).items():
                lat[k].append(median_ms(f, lat_reps))
    e2e = lambda i: lat["end to end, teacher (10 steps)"][i] / lat["end to end, one-step student"][i]  # noqa: E731
    if cfg.compile:
        rows += ["| per chunk, batch 1 | eager (ms) | compiled (ms) | speed-up |", "|---|---|---|---|"]
        rows += [f"| {k} | {a:.1f} | {b:.1f} | {a / b:.1f}x |" for k, (a, b) in lat.items()]
        rows.append(f"| one-step speed-up end to end (teacher / student) | {e2e(0):.2f}x | {e2e(1):.2f}x | |")
    else:
        rows += ["| per chunk, batch 1 | ms |", "|---|---|", *(f"| {k} | {a:.1f} |" for k, (a,) in lat.items()),
                 f"| one-step speed-up end to end (teacher / student) | {e2e(0):.2f}x |"]
    x = 512 if cfg.quick else (8192 if proc.cuda else 2048)  # a GPU reaches its peak only on large products
    a, b = torch.randn(x, x, device=proc.device), torch.randn(x, x, device=proc.device)
    with cast():
        peak = 2 * x ** 3 / (median_ms(lambda: a @ b, 5) / 1000)
    images = random_images(B)
    batch = scaffold.to(observations(vla, images, ["push the puck to the teal marker\n"] * B, torch.randn(B, 4), chunk=8), proc.device)
    rows += ["", f"| training step, batch {B} | step (ms) | samples/s | activations kept (MB) | peak {'GPU' if proc.cuda else 'process'} memory (MB) | GFLOP | MFU |",
             "|---|---|---|---|---|---|---|"]
    attn = vla.vlm.config._attn_implementation
    for ckpt in (False, True):  # the VLA itself, then a copy that checkpoints (the config is frozen at build)
        m = vla if not ckpt else model.VLA(dataclasses.replace(vla.cfg, grad_checkpoint=True), vla.tokenizer,
                                           vlm_config=vla.vlm.config.to_dict())
        m.load_state_dict(vla.state_dict())
        m.to(proc.device).train()
        opt = scaffold.adamw(m.parameters(), proc, lr=1e-5)

        def step():
            with cast():
                loss = m.loss(batch)["loss"]
            scaffold.update(opt, loss, 1.0)
        with cast():
            kept = saved_mb(lambda: m.loss(batch))
        # FLOPs are counted with eager attention: on CUDA, transformers' SDPA path passes grouped-query
        # keys (enable_gqa), whose shapes torch's FLOP counter rejects; eager does the same products.
        m.vlm.set_attn_implementation("eager")
        with FlopCounterMode(display=False) as counter:
            step()
        m.vlm.set_attn_implementation(attn)
        if proc.cuda:  # the peak of the timed steps alone (eager attention holds its score matrices)
            torch.cuda.reset_peak_memory_stats()
        ms = median_ms(step, reps)
        mem = torch.cuda.max_memory_allocated() / 2 ** 20 if proc.cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append(f"| {'gradient checkpointing' if ckpt else 'plain'} | {ms:.0f} | {1000 * B / ms:.2f} | {kept:.0f} | {mem:.0f} | "
                    f"{counter.get_total_flops() / 1e9:.0f} | {counter.get_total_flops() / (ms / 1000) / peak:.1%} |")
        del m, opt
    return rows + ["", f"MFU: FLOPs counted by torch's FlopCounterMode over one step / step time / {peak / 1e9:.0f} GFLOP/s, "
                       f"a {x}x{x} matmul measured now{' in bf16' if bf16 else ' in fp32'}. Process memory on a CPU is the "
                       "peak resident set so far (weights, AdamW states, activations, Python), not per row."]

def main(cfg: Bench, argv: list[str] | None = None):
    import sim  # noqa: F401  (it picks MuJoCo's OpenGL backend, which the header reports)
    head = (f"machine: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"MUJOCO_GL={os.environ.get('MUJOCO_GL')}, numpy {np.__version__}")
    print(head)
    sections = dict(collect=("Collection (scripted experts, rendering included)", bench_collection),
                    model=("The VLA (tiny, CPU) vs transformers' PI0ForConditionalGeneration", bench_model),
                    training=("Training throughput and model FLOP utilisation", bench_training),
                    latency=("Inference latency per action chunk, batch 1", bench_latency))
    md = [head] + ([f"command: `{' '.join(['python bench.py', *argv])}`"] if argv is not None else [])
    if cfg.size != "tiny":  # a real size: that section alone
        sections = dict(real=(f"The VLA at real size ({cfg.size})", bench_real))
    for key, (title, fn) in sections.items():
        if cfg.only in ("", key):
            part = [f"\n#### {title}\n", *fn(cfg)]
            print("\n".join(part), flush=True)
            md += part
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text("\n".join(md) + "\n")

if __name__ == "__main__":
    main(tyro.cli(Bench), sys.argv[1:])
