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


def test_a_pretrained_checkpoint_folder_loads_through_the_same_code(tmp_path):
    """A VLM saved with save_pretrained (as a downloaded SmolVLM would be) loads by path,
    gains the action tokens, and trains and samples."""
    torch.manual_seed(0)
    tiny = model.VLA(model.VLAConfig())
    tiny.vlm.save_pretrained(tmp_path / "vlm")
    tiny.tokenizer.save_pretrained(tmp_path / "vlm")
    m = model.VLA(model.VLAConfig(vlm=str(tmp_path / "vlm"), bins=16))
    for name, p in tiny.vlm.named_parameters():
        if "embed_tokens" not in name and "lm_head" not in name:
            assert torch.equal(p, dict(m.vlm.named_parameters())[name]), name
    assert m.vlm.get_input_embeddings().weight.shape[0] == len(m.tokenizer)
    b = fakes.fake_batch(m, 2)
    assert torch.isfinite(m.loss(b)["loss"])
    assert m.eval().sample(b, 2).shape == (2, 8, 4)


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
