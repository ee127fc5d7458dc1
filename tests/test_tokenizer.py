"""Tokenizer wrapper: round trip, BOS from the post-processor, missing and corrupt files.

The tokenizer is trained here on a few sentences so the test needs no download.
"""

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from jaxpp.errors import JaxppError
from jaxpp.load.tokenizer import Tokenizer

TEXTS = [
  "the quick brown fox jumps over the lazy dog",
  "pipeline parallel inference splits layers across devices",
  "tokens flow through the ring one stage at a time",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("ckpt")
  tok = HFTokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(TEXTS, trainer=trainer)
  tok.post_processor = processors.TemplateProcessing(
    single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
  )
  tok.save(str(d / "tokenizer.json"))
  return d


def test_round_trip_and_bos(tok_dir):
  tok = Tokenizer.from_dir(tok_dir)
  assert tok is not None
  bos = tok.token_to_id("<s>")
  assert bos is not None and tok.token_to_id("no-such-token") is None
  for text in TEXTS + ["a fox in the ring"]:
    ids = tok.encode(text)
    assert ids[0] == bos and bos not in ids[1:]
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False).startswith("<s>")


def test_encode_batch_matches_encode(tok_dir):
  tok = Tokenizer.from_dir(str(tok_dir))
  assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_missing_is_none(tmp_path):
  assert Tokenizer.from_dir(tmp_path) is None
  assert Tokenizer.from_dir(tmp_path / "does-not-exist") is None


def test_corrupt_file_is_one_line_error(tmp_path):
  path = tmp_path / "tokenizer.json"
  path.write_text('{"model": {"type": "BPE", "vocab": ')
  with pytest.raises(JaxppError) as err:
    Tokenizer.from_dir(tmp_path)
  msg = str(err.value)
  assert str(path) in msg and "\n" not in msg
