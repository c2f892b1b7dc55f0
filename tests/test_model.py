"""The VLA: shapes, learning, the flow-matching math, the KV cache, action tokens, checkpoints.

Every batch here is fakes.fake_batch's: these tests need neither the simulator nor a dataset."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
import data
import etc
import fakes
import model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vla():
    torch.manual_seed(0)
    return model.VLA(model.VLAConfig())


def test_import_model_loads_neither_the_simulator_nor_the_data_code():
    code = "import sys, model; bad = {'mujoco', 'sim', 'data', 'etc'} & set(sys.modules); assert not bad, bad"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1000:]


def test_shapes_and_loss_terms(vla):
    act, etc = fakes.fake_batch(vla, 6), fakes.fake_batch(vla, 3, answers=True)
    out = vla.loss(act)
    assert out["loss"].ndim == 0 and set(out) == {"loss", "flow"} and torch.isfinite(out["loss"])
    assert set(vla.loss(etc)) == {"loss", "lm"}
    vla.eval()
    assert vla.sample(act, 2).shape == (6, 8, 4)
    new = model.greedy(vla.vlm, etc, 4, vla.tokenizer.eos_token_id, vla.tokenizer.pad_token_id)
    assert new.shape[0] == 3 and new.shape[1] <= 4
    prefix = vla.prefix(act)
    assert len(prefix["kv"]) == len(vla.feed_layers) == 4
    assert vla.expert.project(prefix)["kv"][0][0].shape[:2] == (6, vla.cfg.expert_heads)


def overfit(cfg: model.VLAConfig, answers: bool, steps: int, key: str) -> tuple[float, float]:
    """Train a fresh model on one fake batch, fixed noise and times; first and best late loss."""
    torch.manual_seed(0)
    m = model.VLA(cfg)
    batch = fakes.fake_batch(m, 6, answers=answers)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        out = m.loss(batch, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out[key].item())
    return losses[0], min(losses[-5:])


@pytest.mark.parametrize("head, answers, key, steps", [("flow", False, "flow", 150), ("tokens", False, "tokens", 60),
                                                       ("flow", True, "lm", 60)], ids=["flow", "tokens", "etc"])
def test_overfitting_one_batch_cuts_the_loss_tenfold(head, answers, key, steps):
    first, last = overfit(model.VLAConfig(head=head), answers, steps, key)
    assert last < first / 10, (first, last)


def test_euler_is_exact_for_a_constant_velocity():
    x1 = torch.randn(3, 8, 4)
    c = torch.randn(3, 8, 4)
    for n in (1, 3, 10):
        np.testing.assert_allclose(model.euler(lambda x, t: c, x1, n), x1 - c, atol=1e-6)


def test_denoiser_and_schedule_follow_the_time_convention(vla):
    """x0_hat = x_t - t v and score = -(x_t - alpha x0_hat) / sigma^2 = -eps_hat / sigma."""
    act = fakes.fake_batch(vla, 6)
    vla.eval()
    with torch.no_grad():
        prefix = vla.prefix(act)
        a, eps, t = act["actions"], torch.randn_like(act["actions"]), torch.full((6,), 0.3)
        x_t, u = model.flow_target(a, eps, t)
        alpha, sigma = model.schedule(t)
        np.testing.assert_allclose(x_t, alpha[:, None, None] * a + sigma[:, None, None] * eps, atol=1e-6)
        np.testing.assert_allclose(x_t - t[:, None, None] * u, a, atol=1e-6)  # a perfect v gives x0
        v = vla.expert(x_t, t, vla.expert.project(prefix))
        np.testing.assert_allclose(vla.denoise(x_t, t, prefix), x_t - 0.3 * v, atol=1e-6)
        ones = torch.ones(6)  # at t = 1 the denoiser is one Euler step: what a one-step student samples
        np.testing.assert_allclose(vla.denoise(eps, ones, prefix), model.euler(lambda x, tt: vla.expert(x, tt, vla.expert.project(prefix)), eps, 1), atol=1e-6)


def test_cached_prefix_sampling_equals_recomputing_the_prefix(vla):
    act = fakes.fake_batch(vla, 6)
    vla.eval()
    x1 = torch.randn(6, 8, 4)
    with torch.no_grad():
        cached = vla.sample(act, 5, noise=x1)
        fresh = model.euler(lambda x, t: vla.expert(x, t, vla.expert.project(vla.prefix(act))), x1, 5)
    np.testing.assert_allclose(cached, fresh, atol=1e-5)


def test_padding_does_not_change_the_prefix(vla):
    """Row 0 alone and right-padded in a batch with a longer prompt gives the same chunk."""
    act = fakes.fake_batch(vla, 2)
    n = int(act["attention_mask"][0].sum())
    assert n < act["input_ids"].shape[1]  # row 0 is padded
    alone = {k: v[:1, :n] if k in ("input_ids", "attention_mask") else v[:1] for k, v in act.items()}
    vla.eval()
    x1 = torch.randn(2, 8, 4)
    np.testing.assert_allclose(vla.sample(alone, 3, noise=x1[:1])[0], vla.sample(act, 3, noise=x1)[0], atol=1e-5)


def test_compiled_inference_gives_eagers_actions():
    """VLA.compile_inference (torch.compile; CUDA graphs on a GPU): the same chunks as eager, at 10
    steps and at 1, for prompts the compiled path pads to their bucket. Its own VLA: the switch stays
    on the object it was called on, and the module's fixture stays eager."""
    torch.manual_seed(0)
    vla = model.VLA(model.VLAConfig()).eval()
    act, x1 = fakes.fake_batch(vla, 2), torch.randn(2, 8, 4)
    assert act["input_ids"].shape[1] % model.PROMPT_BUCKET  # the compiled path pads this prompt
    eager = [vla.sample(act, n, noise=x1) for n in (10, 1)]
    vla.compile_inference()
    fast = [vla.sample(act, n, noise=x1) for n in (10, 1)]
    for e, f in zip(eager, fast):
        np.testing.assert_allclose(f, e, atol=1e-5)
    assert not torch.equal(fast[0], fast[1])  # 10 steps and 1 are different chunks, not one cached output


def test_action_tokens_round_trip_within_half_a_bin(vla):
    a = torch.empty(64, 8, 4).uniform_(-3, 3)
    bins = model.to_bins(a, vla.cfg.bins, vla.cfg.token_range)
    assert bins.min() >= 0 and bins.max() < vla.cfg.bins
    width = 2 * vla.cfg.token_range / vla.cfg.bins
    assert (model.from_bins(bins, vla.cfg.bins, vla.cfg.token_range) - a).abs().max() <= width / 2 + 1e-6
    assert vla.tokenizer.convert_ids_to_tokens(int(bins[0, 0, 0]) + vla.act0).startswith("<act")


def test_save_load_round_trip_is_identical_and_keeps_the_provenance(vla, tmp_path):
    act = fakes.fake_batch(vla, 6)
    vla.eval()
    vla.save(tmp_path / "ck", provenance=dict(script="test", action_steps=3))
    back = model.load(tmp_path / "ck")
    for (k, p), (k2, p2) in zip(vla.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(p, p2), k
    x1 = torch.randn(6, 8, 4)
    assert torch.equal(vla.sample(act, 4, noise=x1), back.sample(act, 4, noise=x1))
    assert {"config.json", "model.safetensors", "stats.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "ck").iterdir()}
    assert model.read_config(tmp_path / "ck")["provenance"] == dict(script="test", action_steps=3)
    student = model.load(tmp_path / "ck", steps=1)  # an override builds a new config; none is mutated
    assert student.cfg.steps == 1 and back.cfg.steps == 10
    with pytest.raises(dataclasses.FrozenInstanceError):
        student.cfg.steps = 2


def test_mismatched_or_missing_checkpoints_fail_clearly(vla, tmp_path):
    with pytest.raises(model.CheckpointError, match="no checkpoint at"):
        model.load(tmp_path / "nothing")
    vla.save(tmp_path / "ck")
    with pytest.raises(model.CheckpointError, match="head='flow', expected 'tokens'"):
        model.load(tmp_path / "ck", expect={"head": "tokens"})
    torch.manual_seed(1)
    model.VLA(model.VLAConfig(expert_width=64)).save(tmp_path / "other")
    (tmp_path / "ck" / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(model.CheckpointError, match="does not fit this architecture"):
        model.load(tmp_path / "ck")


def test_options_freeze_vision_and_insulate():
    torch.manual_seed(0)
    m = model.VLA(model.VLAConfig(freeze_vision=True, insulate=True, feed_layers=(1, 3)))
    act = fakes.fake_batch(m, 4)
    assert not any(p.requires_grad for p in m.vlm.model.vision_model.parameters())
    m.loss(act)["loss"].backward()
    assert all(p.grad is None for p in m.vlm.parameters())  # insulated: no action gradient in the VLM
    assert all(p.grad is not None for p in m.expert.parameters())
    assert len(m.expert.layers) == 2
    torch.manual_seed(0)
    m = model.VLA(model.VLAConfig())
    model.global_loss(m(act=act, insulate=True), {"flow": 1.0})[0].backward()  # one step's warm-up
    assert all(p.grad is None for p in m.vlm.parameters()) and m.expert.action_out.weight.grad is not None
    model.global_loss(m(act=act), {"flow": 1.0})[0].backward()
    assert m.vlm.model.text_model.layers[0].mlp.up_proj.weight.grad is not None


def test_flow_convention_agrees_with_transformers_pi0(vla):
    """Drive transformers' PI0ForConditionalGeneration with our x_t, u, time embedding and
    Euler loop: its own loss and its own sampler give the same numbers."""
    torch.manual_seed(0)
    peer = bench.pi0_peer(vla).eval()
    B, img_tokens = 2, 64
    ids = torch.cat([torch.full((B, img_tokens), peer.config.vlm_config.image_token_id), torch.randint(0, 256, (B, 12))], 1)
    inputs = dict(input_ids=ids, pixel_values=torch.rand(B, 1, 3, 64, 64) * 2 - 1,
                  attention_mask=torch.ones_like(ids), pixel_attention_mask=torch.ones(B, 1, dtype=torch.bool))
    state, a, eps, t = torch.randn(B, 4), torch.randn(B, 8, 4), torch.randn(B, 8, 4), torch.rand(B)
    with torch.no_grad():
        theirs = peer(state=state, noise=eps, timestep=t, actions=a, **inputs).loss
        x_t, u = model.flow_target(a, eps, t)
        v = peer(state=state, noise=x_t, timestep=t, **inputs).logits  # their net, our x_t
        torch.testing.assert_close(torch.nn.functional.mse_loss(v, u), theirs)  # our target u
        s, n = model.flow_sums(v, u, torch.ones(B, 8))
        torch.testing.assert_close(s / n, theirs)
        ours = model.euler(lambda x, tt: peer(state=state, noise=x, timestep=tt, **inputs).logits, eps, 3)
        torch.testing.assert_close(ours, peer.sample_actions(state=state, noise=eps, num_steps=3, **inputs))
        emb = peer.embed_action_time.sinusoid_embeds(t)
        torch.testing.assert_close(model.time_embedding(t, emb.shape[-1]), emb)


def smolvlm_like(tmp_path, bos: bool = True):
    """A folder as a downloaded SmolVLM's looks (weights, tokenizer with its image wrapper tokens
    and no action tokens, Idefics3 processor), at tiny size and random: (folder, vla it came from)."""
    from tokenizers import processors
    from transformers import AutoConfig, AutoModelForImageTextToText, Idefics3ImageProcessorPil, Idefics3Processor
    torch.manual_seed(0)
    tok = model.tiny_tokenizer(0, etc.corpus(), image_wrap=True)
    if not bos:  # SmolVLM's own tokenizer puts nothing first
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    vc = model.tiny_vlm_config(len(tok), tok.convert_tokens_to_ids("<image>"), 64, 16)
    vlm = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**vc))
    image = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 64}, max_image_size={"longest_edge": 64})
    proc = Idefics3Processor(image_processor=image, tokenizer=tok, image_seq_len=16)  # 64 px, patch 8, shuffle 2
    for part in (vlm, proc):
        part.save_pretrained(tmp_path / "vlm")
    return tmp_path / "vlm", vlm, tok, proc


def test_a_pretrained_checkpoint_folder_loads_by_path_and_trains_a_step(tmp_path):
    """A VLM saved with save_pretrained (as a downloaded SmolVLM would be) loads by path with its
    tokenizer, gains the action tokens, and trains a step and samples through the same code."""
    path, vlm, tok, _ = smolvlm_like(tmp_path)
    m = model.VLA(model.VLAConfig(vlm=str(path), bins=16))
    for name, p in vlm.named_parameters():
        if "embed_tokens" not in name and "lm_head" not in name:
            assert torch.equal(p, dict(m.vlm.named_parameters())[name]), name
    assert m.vlm.get_input_embeddings().weight.shape[0] == len(m.tokenizer) == len(tok) + 16
    assert m.image_ids[2:18] == [vlm.config.image_token_id] * 16 and m.image_ids[:2] == m.tokenizer.convert_tokens_to_ids(["<fake_token_around_image>", "<global-img>"])
    b = fakes.fake_batch(m, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    before = m.vlm.model.text_model.layers[0].mlp.up_proj.weight.clone()
    loss = m.loss(b)["loss"]
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, m.vlm.model.text_model.layers[0].mlp.up_proj.weight)
    assert m.eval().sample(b, 2).shape == (2, 8, 4)


@pytest.mark.parametrize("bos", [True, False])
def test_prompts_are_laid_out_as_smolvlms_processor_lays_them_out(tmp_path, bos):
    """Our ids (data.collate) equal Idefics3Processor's for "<image>" + prompt with image
    splitting off, whether or not the tokenizer puts <bos> first; a flat image's pixels too."""
    path, _, _, proc = smolvlm_like(tmp_path, bos)
    m = model.VLA(model.VLAConfig(vlm=str(path)))
    image = np.full((64, 64, 3), 200, np.uint8)  # flat: resampling filters agree exactly
    for text in ["push the puck to the teal marker", "question: where is the gripper?\nanswer: "]:
        ours = data.collate([dict(image=image, text=text)], m.tokenizer, m.image_ids)
        theirs = proc(text="<image>" + text, images=[[image]], return_tensors="pt")
        assert ours["input_ids"][0].tolist() == theirs["input_ids"][0].tolist()
        assert (ours["input_ids"][0, 0] == m.tokenizer.bos_token_id) == bos
        torch.testing.assert_close(model.pixels(m.vlm, ours["images"])[:, 0], theirs["pixel_values"][:, 0], atol=1e-6, rtol=0)


def test_presets_build_the_published_smolvlm_architectures_offline():
    """--vlm smolvlm-256m / smolvlm-500m: the hub checkpoints' shapes (256,484,928 and 507,482,304
    VLM parameters, 64 image tokens per 512 px image), built on the meta device (no memory)."""
    for name, n in [("smolvlm-256m", 256_484_928), ("smolvlm-500m", 507_482_304)]:
        with torch.device("meta"):
            m = model.VLA(model.VLAConfig(vlm=name), corpus=etc.corpus())
        assert sum(p.numel() for p in m.vlm.parameters()) == n, name
        vc = m.vlm.config.vision_config
        assert (vc.image_size, vc.patch_size, m.vlm.config.scale_factor) == (512, 16, 4)
        assert m.image_ids.count(m.vlm.config.image_token_id) == 64 and len(m.image_ids) == 67
        assert len(m.expert.layers) == m.vlm.config.text_config.num_hidden_layers


def one_step(m, batch) -> tuple[float, float, list]:
    """(MB of activations autograd keeps for backward (bench.saved_mb), the loss, the gradients)."""
    m.zero_grad()
    out = {}
    kept = bench.saved_mb(lambda: out.update(m.loss(batch, generator=torch.Generator().manual_seed(0))))
    out["loss"].backward()
    return kept, out["loss"].item(), [p.grad.clone() for p in m.parameters() if p.grad is not None]


def test_gradient_checkpointing_saves_memory_and_changes_no_gradient(vla):
    torch.manual_seed(0)
    ckpt = model.VLA(model.VLAConfig(grad_checkpoint=True), vla.tokenizer, vlm_config=vla.vlm.config.to_dict())
    ckpt.load_state_dict(vla.state_dict())
    b = fakes.fake_batch(vla, 4)
    (mem, loss, grads), (mem_c, loss_c, grads_c) = one_step(vla.train(), b), one_step(ckpt.train(), b)
    assert loss == loss_c and mem_c < mem  # the tiny tower has no layers: what is saved is the expert's (~15%)
    for g, gc in zip(grads, grads_c):
        torch.testing.assert_close(g, gc)


def test_bf16_autocast_on_cpu_tracks_fp32(vla):
    """--dtype bfloat16: autocast's bf16 matmuls give the fp32 loss to bf16 precision, and the
    weights, gradients and logits stay fp32."""
    b = fakes.fake_batch(vla, 4)
    loss = vla.loss(b, generator=torch.Generator().manual_seed(0))["loss"]
    with torch.autocast("cpu", torch.bfloat16):
        low = vla.loss(b, generator=torch.Generator().manual_seed(0))["loss"]
        logits = vla.vlm.lm_head(torch.randn(2, vla.vlm.config.text_config.hidden_size))
    low.backward()
    assert logits.dtype == torch.float32  # model.FP32Head: bf16 logits blur neighbouring numbers
    assert low.dtype == torch.float32 and abs(low.item() - loss.item()) < 0.02 * loss.item()
    assert all(p.grad.dtype == torch.float32 for p in vla.parameters() if p.grad is not None)
    vla.zero_grad()


def test_cached_padded_greedy_decoding_equals_a_plain_forward(vla):
    """Each token greedy() picks (KV cache, right-padded batch) is the argmax of a plain
    forward pass over that row's unpadded prompt plus the tokens before it."""
    b = fakes.fake_batch(vla, 2)
    vla.eval()
    new = model.greedy(vla.vlm, b, 5, -1, vla.tokenizer.pad_token_id)  # eos -1: never stops early
    assert int(b["attention_mask"][0].sum()) < b["input_ids"].shape[1]  # row 0 is padded
    for i in range(2):
        n = int(b["attention_mask"][i].sum())
        seq = torch.cat([b["input_ids"][i, :n], new[i]])[None]
        with torch.no_grad():
            logits = vla.vlm(input_ids=seq, attention_mask=torch.ones_like(seq),
                             pixel_values=model.pixels(vla.vlm, b["images"][i:i + 1])).logits[0]
        np.testing.assert_array_equal(logits[n - 1:n - 1 + 5].argmax(-1), new[i])
    acts = model.greedy(vla.vlm, b, 6, -1, 0, allowed=(vla.act0, vla.act0 + vla.cfg.bins))
    assert acts.min() >= vla.act0 and acts.max() < vla.act0 + vla.cfg.bins


def test_the_tiny_tokenizer_writes_every_number_as_one_token_wherever_it_stands():
    """A number opening an answer (collate puts a space before it) is the same single token as in a
    prompt, and after a comma; a word too. Any text still encodes (bytes) and decodes back."""
    tok = model.tiny_tokenizer(8, etc.corpus())
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    for n in range(256):
        assert len(enc(f" {n}")) == 1 and enc(f" {n}") == enc(f"reach {n}")[1:] == enc(f"1, {n}")[2:], n
    assert enc(" 61 45") == enc(" 61") + enc(" 45") and enc(" blue") == enc("the blue marker")[1:2]
    assert tok.decode(enc("question: où est le 3e marqueur?\nanswer:")).strip() == "question: où est le 3e marqueur?\nanswer:"


def test_a_vlm_built_from_scratch_has_unit_variance_token_embeddings():
    torch.manual_seed(0)
    for std in (1.0, 0.02):
        e = model.VLA(model.VLAConfig(embed_std=std)).vlm.get_input_embeddings().weight
        assert abs(e.std().item() / std - 1) < 0.02


def test_the_tiny_vision_tower_is_siglips_patch_embedding_at_fan_in_scale(vla):
    """docs/notes.md, "Flat discs": as SmolVLM's tower at toy size it does not bind; cut to its patch embedding it does."""
    vc, tower = vla.vlm.config, vla.vlm.model.vision_model
    assert (vc.vision_config.patch_size, vc.vision_config.num_hidden_layers, vc.scale_factor, len(vla.image_ids)) == (16, 0, 1, 16)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in tower.modules())  # the post-LayerNorm is dropped
    for w in (tower.embeddings.patch_embedding.weight, vla.vlm.model.connector.modality_projection.proj.weight):
        assert abs(w.std().item() * w[0].numel() ** 0.5 - 1) < 0.05  # std 1/sqrt(fan_in), not transformers' 0.02
    assert abs(tower.embeddings.position_embedding.weight.std().item() - 1) < 0.1
