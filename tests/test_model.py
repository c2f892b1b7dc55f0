"""The VLA: shapes, learning, the flow-matching math, the KV cache, action tokens, checkpoints."""
import numpy as np
import pytest
import torch

import bench
import data
import model


@pytest.fixture(scope="module")
def vla():
    torch.manual_seed(0)
    return model.VLA(model.VLAConfig())


@pytest.fixture(scope="module")
def batches(vla, dataset):
    acts = data.ActionSamples(dataset, chunk=8)
    rng = np.random.default_rng(0)
    last = dataset.episode_frames("reach")[0][-1]  # a chunk that runs past the episode's end
    ids = [acts.index.index(("reach", int(last) - 2))] + list(range(0, len(acts), len(acts) // 5))[:5]
    action = data.collate([acts(i, rng) for i in ids], vla.tokenizer, vla.image_ids)
    recs = data.etc_records(dataset)[::97][:6]
    etc = data.collate([data.etc_sample(dataset, r) for r in recs], vla.tokenizer, vla.image_ids)
    return action, etc, recs


def test_shapes_and_loss_terms(vla, batches):
    action, etc, recs = batches
    out = vla.loss(action)
    assert out["loss"].ndim == 0 and set(out) == {"loss", "flow"} and torch.isfinite(out["loss"])
    assert set(vla.loss(etc)) == {"loss", "lm"}
    vla.eval()
    chunk = vla.predict_action_chunk(action["images"], ["push the puck"] * 6, action["proprio"], num_steps=2)
    assert chunk.shape == (6, 8, 4)
    answers = vla.answer(etc["images"][:2], [r["question"] for r in recs[:2]], max_new=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    prefix = vla.prefix(action)
    assert len(prefix["kv"]) == len(vla.cfg.feed_layers) == 4
    assert prefix["kv"][0][0].shape[:2] == (6, vla.cfg.expert_heads)


def overfit(cfg: model.VLAConfig, batch: dict, steps: int, key: str) -> tuple[float, float]:
    """Train a fresh model on one batch, fixed noise and times; first and last loss."""
    torch.manual_seed(0)
    m = model.VLA(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        out = m.loss(batch, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out[key].item())
    return losses[0], min(losses[-5:])


@pytest.mark.parametrize("head, key, steps", [("flow", "flow", 150), ("tokens", "tokens", 60)])
def test_overfitting_one_batch_cuts_the_loss_tenfold(batches, head, key, steps):
    first, last = overfit(model.VLAConfig(head=head), batches[0], steps, key)
    assert last < first / 10, (first, last)


def test_overfitting_etc_answers(batches):
    first, last = overfit(model.VLAConfig(), batches[1], 60, "lm")
    assert last < first / 10, (first, last)


def test_euler_is_exact_for_a_constant_velocity():
    x1 = torch.randn(3, 8, 4)
    c = torch.randn(3, 8, 4)
    for n in (1, 3, 10):
        np.testing.assert_allclose(model.euler(lambda x, t: c, x1, n), x1 - c, atol=1e-6)


def test_denoiser_and_schedule_follow_the_time_convention(vla, batches):
    """x0_hat = x_t - t v and score = -(x_t - alpha x0_hat) / sigma^2 = -eps_hat / sigma."""
    action = batches[0]
    vla.eval()
    with torch.no_grad():
        prefix = vla.prefix(action)
        a, eps, t = action["actions"], torch.randn_like(action["actions"]), torch.full((6,), 0.3)
        x_t, u = model.flow_target(a, eps, t)
        alpha, sigma = model.schedule(t)
        np.testing.assert_allclose(x_t, alpha[:, None, None] * a + sigma[:, None, None] * eps, atol=1e-6)
        np.testing.assert_allclose(x_t - t[:, None, None] * u, a, atol=1e-6)  # a perfect v gives x0
        v = vla.expert(x_t, t, action["proprio"], prefix)
        np.testing.assert_allclose(vla.denoise(x_t, t, prefix), x_t - 0.3 * v, atol=1e-6)


def test_cached_prefix_sampling_equals_recomputing_the_prefix(vla, batches):
    action = batches[0]
    vla.eval()
    x1 = torch.randn(6, 8, 4)
    with torch.no_grad():
        cached = vla.predict_action_chunk(action["images"], ["push the puck"] * 6, action["proprio"], 5, noise=x1)
        b = vla.batch_from(action["images"], ["push the puck\n"] * 6, action["proprio"])
        fresh = model.euler(lambda x, t: vla.expert(x, t, b["proprio"], vla.prefix(b)), x1, 5)
    np.testing.assert_allclose(cached, fresh, atol=1e-5)


def test_padding_does_not_change_the_prefix(vla, batches):
    """The same observation alone and in a batch with longer prompts gives the same chunk."""
    action = batches[0]
    vla.eval()
    x1 = torch.randn(2, 8, 4)
    with torch.no_grad():
        alone = vla.predict_action_chunk(action["images"][:1], ["reach"], action["proprio"][:1], 3, noise=x1[:1])
        padded = vla.predict_action_chunk(action["images"][:2], ["reach", "a much longer instruction here"],
                                          action["proprio"][:2], 3, noise=x1)
    np.testing.assert_allclose(alone[0], padded[0], atol=1e-5)


def test_action_tokens_round_trip_within_one_bin(vla):
    a = torch.empty(64, 8, 4).uniform_(-3, 3)
    ids = vla.action_token_ids(a)
    assert ids.min() >= vla.act0 and ids.max() < vla.act0 + vla.cfg.bins
    back = vla.from_bins(ids - vla.act0).view_as(a)
    width = 2 * vla.cfg.token_range / vla.cfg.bins
    assert (back - a).abs().max() <= width / 2 + 1e-6  # bin centres: within half a bin
    assert vla.tokenizer.convert_ids_to_tokens(int(ids[0, 0])).startswith("<act")


def test_save_load_round_trip_is_identical(vla, batches, tmp_path):
    action = batches[0]
    vla.eval()
    vla.save(tmp_path / "ck")
    back = model.load(tmp_path / "ck")
    for (k, p), (k2, p2) in zip(vla.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(p, p2), k
    x1 = torch.randn(6, 8, 4)
    args = (action["images"], ["reach the goal"] * 6, action["proprio"], 4)
    assert torch.equal(vla.predict_action_chunk(*args, noise=x1), back.predict_action_chunk(*args, noise=x1))
    names = {p.name for p in (tmp_path / "ck").iterdir()}
    assert {"config.json", "model.safetensors", "stats.json", "tokenizer.json"} <= names


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


def test_options_freeze_vision_and_insulate(batches):
    action = batches[0]
    torch.manual_seed(0)
    m = model.VLA(model.VLAConfig(freeze_vision=True, insulate=True, feed_layers=(1, 3)))
    assert not any(p.requires_grad for p in m.vlm.model.vision_model.parameters())
    m.loss(action)["loss"].backward()
    assert all(p.grad is None for p in m.vlm.parameters())  # insulated: no action gradient in the VLM
    assert all(p.grad is not None for p in m.expert.parameters())
    assert len(m.expert.layers) == 2


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
        torch.testing.assert_close(model.flow_loss(v, u, torch.ones(B, 8)), theirs)
        ours = model.euler(lambda x, tt: peer(state=state, noise=x, timestep=tt, **inputs).logits, eps, 3)
        torch.testing.assert_close(ours, peer.sample_actions(state=state, noise=eps, num_steps=3, **inputs))
        emb = peer.embed_action_time.sinusoid_embeds(t)
        torch.testing.assert_close(model.time_embedding(t, emb.shape[-1]), emb)


def test_a_pretrained_checkpoint_folder_loads_through_the_same_code(tmp_path, batches):
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
    b = data.collate([dict(image=batches[0]["images"][i].numpy(), text="reach\n",
                           proprio=batches[0]["proprio"][i].numpy(), actions=batches[0]["actions"][i].numpy(),
                           action_mask=batches[0]["action_mask"][i].numpy()) for i in range(2)], m.tokenizer, m.image_ids)
    assert torch.isfinite(m.loss(b)["loss"])
    assert m.eval().sample(b, 2).shape == (2, 8, 4)


def test_cached_padded_greedy_decoding_equals_a_plain_forward(vla, batches):
    """Each token generate() picks (KV cache, right-padded batch) is the argmax of a plain
    forward pass over that row's unpadded prompt plus the tokens before it."""
    _, etc, recs = batches
    vla.eval()
    qs = [f"question: {recs[0]['question']}\nanswer: ", "question: a much longer question, so the first row is padded?\nanswer: "]
    b = vla.batch_from(etc["images"][:2], qs)
    new = vla.generate(b, 5)
    for i in range(2):
        n = int(b["attention_mask"][i].sum())
        seq = torch.cat([b["input_ids"][i, :n], new[i]])[None]
        with torch.no_grad():
            logits = vla.vlm(input_ids=seq, attention_mask=torch.ones_like(seq),
                             pixel_values=vla.pixels(b["images"][i:i + 1])).logits[0]
        np.testing.assert_array_equal(logits[n - 1:n - 1 + 5].argmax(-1), new[i])
    assert vla.generate(vla.batch_from(etc["images"][:1], ["q"]), 6, actions=True).min() >= vla.act0
