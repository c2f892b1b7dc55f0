"""Shared fixtures: one tiny real dataset (collected once per run) and a real tokenizer.

The simulator is imported only by the fixtures that collect data, so that the model tests
(tests/test_model.py) run without MuJoCo. Every test fails on a deprecation notice that our
use of a library raises: pytest.ini turns DeprecationWarning and FutureWarning into errors, and
the fixture below does the same for transformers' deprecation messages, which are logged."""
import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(autouse=True)
def no_deprecation_notices():
    class Catch(logging.Handler):
        def emit(self, record):
            if "deprecat" in record.getMessage().lower():
                seen.append(record.getMessage())
    seen, handler, log = [], Catch(), logging.getLogger("transformers")
    log.addHandler(handler)
    yield
    log.removeHandler(handler)
    assert not seen, f"a library says our use of it is deprecated: {seen}"


@pytest.fixture(scope="session")
def dataset_path(tmp_path_factory):
    """Two tasks, two episodes each, collected by the real simulator and experts."""
    import data
    out = tmp_path_factory.mktemp("ds") / "source"
    data.collect(data.Collect(tasks=("reach", "pick-place"), episodes=2, out=str(out), workers=1))
    return out


@pytest.fixture(scope="session")
def dataset(dataset_path):
    import data
    return data.Dataset(dataset_path)


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level tokenizer built offline with `tokenizers` (no hub), as a HF fast tokenizer; it
    puts <bos> first itself, as the tiny VLM's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for special in ("<pad>", "<bos>", "<eos>", "<image>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", additional_special_tokens=["<image>"])


@pytest.fixture(scope="session")
def etc_path(dataset_path):
    """The tiny dataset with its etc.jsonl written."""
    import etc
    etc.write(etc.Etc(data=str(dataset_path)))
    return dataset_path
