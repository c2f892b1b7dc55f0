"""Shared fixtures: one tiny real dataset (collected once per run) and a real tokenizer."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402


@pytest.fixture(scope="session")
def dataset_path(tmp_path_factory):
    """Two tasks, two episodes each, collected by the real simulator and experts."""
    out = tmp_path_factory.mktemp("ds") / "source"
    data.collect(data.Collect(tasks=("reach", "pick-place"), episodes=2, out=str(out), workers=1))
    return out


@pytest.fixture(scope="session")
def dataset(dataset_path):
    return data.Dataset(dataset_path)


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level tokenizer built offline with `tokenizers` (no hub), as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for special in ("<pad>", "<bos>", "<eos>", "<image>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", additional_special_tokens=["<image>"])


@pytest.fixture(scope="session")
def etc_path(dataset_path):
    """The tiny dataset with its etc.jsonl written."""
    data.write_etc(data.Etc(data=str(dataset_path)))
    return dataset_path
