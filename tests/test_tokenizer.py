"""Tokenizers: our fixed-length policy around HF `tokenizers`, equal to the references on any Unicode.

References: transformers' BERT tokenizer for WordPiece (loaded from the same
MiniLM files, with its own padding and truncation) and `open_clip.tokenize` for
CLIP's BPE, on seeded random strings across scripts.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from mcad_jax.data import tokenizer as tokenizers
from tests import torch_refs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Code-point ranges a generated "word" is drawn from (no surrogates).
BLOCKS = [
    (0x21, 0x7E), (0x30, 0x39), (0xC0, 0xFF), (0x100, 0x17F), (0x180, 0x24F), (0x250, 0x2AF),
    (0x1E00, 0x1EFF), (0x300, 0x36F), (0x370, 0x3FF), (0x1F00, 0x1FFF), (0x400, 0x4FF),
    (0x590, 0x5FF), (0x600, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0xAC00, 0xD7A3),
    (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2EBE0),
    (0x30000, 0x3134A), (0xF900, 0xFAFF), (0x200B, 0x200F), (0x2060, 0x2064), (0xFEFF, 0xFEFF),
    (0xAD, 0xAD), (0x1F300, 0x1FAFF), (0x1F3FB, 0x1F3FF), (0xFE00, 0xFE0F), (0x2000, 0x206F),
    (0x3000, 0x303F), (0xFF00, 0xFFEF), (0x1D400, 0x1D7FF), (0x0, 0x1F), (0x7F, 0x9F),
    (0xE000, 0xE0FF), (0xFFFD, 0xFFFD), (0x2100, 0x214F), (0x1F1E6, 0x1F1FF),
]
SPACES = [" ", " ", " ", "  ", "\t", "\n", "\u3000", "\u00a0", "\u2009", "\u200b", ""]
FIXED = ["", " ", "a large red circle to the left of a small blue square", "A picture of a DOG; running!",
         "&amp; an  html   entity &lt;b&gt;", "word " * 100, "Caf\u00e9 na\u00efve \u2126 \u212a",
         "'S 'T 'LL \u017f 's '\u017f \u2603\u2603 \u1fb3\u0345a\u0345",
         "日本語のテキスト 𠀀𪜀 Ωμέγα مرحبا नमस्ते 👍🏽 ‍",
         "x" * 150, "un\u0301ique\u200dword", "<start_of_text> hi <END_OF_TEXT>"]


def random_strings(n: int, seed: int) -> list[str]:
  """n strings of 1-30 words, each word from one randomly chosen script block."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    words = []
    for _ in range(int(rng.integers(1, 31))):
      lo, hi = BLOCKS[int(rng.integers(len(BLOCKS)))]
      words.append("".join(chr(int(c)) for c in rng.integers(lo, hi + 1, int(rng.integers(1, 9)))))
      words.append(SPACES[int(rng.integers(len(SPACES)))])
    out.append("".join(words))
  return out


@pytest.mark.parametrize("max_len", [8, 40])
def test_wordpiece_equals_transformers_on_any_unicode(max_len):
  transformers = pytest.importorskip("transformers")
  ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(tokenizers.default_vocab_path()))
  texts = FIXED + random_strings(1500, seed=max_len)
  want = np.asarray(ref(texts, padding="max_length", truncation=True, max_length=max_len)["input_ids"])
  got = tokenizers.make("wordpiece", max_len).encode_batch(texts)
  bad = np.where((got != want).any(1))[0]
  assert not len(bad), [(texts[i], got[i], want[i]) for i in bad[:3]]
  # Not a vacuous pass: the strings cover many tokens, truncation and [UNK].
  assert len(np.unique(got)) > 500 and (got[:, -1] == 102).any() and (got == 100).any()


def test_wordpiece_from_vocab_txt_equals_tokenizer_json():
  texts = FIXED + random_strings(500, seed=3)
  a = tokenizers.make("wordpiece", 24).encode_batch(texts)
  b = tokenizers.make(f"wordpiece:{tokenizers.default_vocab_path()}", 24).encode_batch(texts)
  np.testing.assert_array_equal(a, b)


def test_clip_equals_open_clip_on_any_unicode():
  pytest.importorskip("torch")
  torch_refs.torchvision_on_cpu_torch()
  open_clip_tok = pytest.importorskip("open_clip.tokenizer")
  texts = FIXED + random_strings(1500, seed=1)
  got = tokenizers.make("clip", 77).encode_batch(texts)
  want = open_clip_tok.tokenize(texts).numpy()
  bad = np.where((got != want).any(1))[0]
  assert not len(bad), [(texts[i], got[i][:12], want[i][:12]) for i in bad[:3]]
  assert len(np.unique(got)) > 1000 and (got[:, -1] == 49407).any()
  short = tokenizers.make("clip", 16).encode_batch(texts)  # Other lengths cut the same way.
  np.testing.assert_array_equal(short, open_clip_tok.tokenize(texts, context_length=16).numpy())


def test_clip_from_vocab_json_and_merges_txt(tmp_path):
  """A checkpoint's vocab.json + merges.txt (HF's CLIP layout) gives the same ids."""
  import json

  vocab, merges = tokenizers._clip_vocab(tokenizers.default_bpe_path())
  hf_vocab = {("<|startoftext|>" if t == tokenizers.CLIP_SOT else "<|endoftext|>"
               if t == tokenizers.CLIP_EOT else t): i for t, i in vocab.items()}
  (tmp_path / "vocab.json").write_text(json.dumps(hf_vocab))
  (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
  texts = FIXED + random_strings(300, seed=5)
  np.testing.assert_array_equal(tokenizers.make(f"clip:{tmp_path}", 77).encode_batch(texts),
                                tokenizers.make("clip", 77).encode_batch(texts))


def test_policy():
  tok = tokenizers.make("wordpiece", 8)
  ids = tok.encode("A small, RED circle!")
  assert ids.dtype == np.int32 and ids.shape == (8,)
  words = [tok.hf.id_to_token(int(i)) for i in ids if i]
  assert words == ["[CLS]", "a", "small", ",", "red", "circle", "!", "[SEP]"]
  long = tok.encode("one two three four five six seven eight nine")
  assert long[-1] == tok.sep_id and (long != 0).all()
  assert list(tok.encode(b"red")[3:]) == [0] * 5
  assert tok.decode(tok.encode("a tiny rhombus")) == "a tiny rhombus"
  assert tok.encode_batch([]).shape == (0, 8)
  pieces = [i for i in tok.encode("rhombuses") if i]  # Word pieces that join back.
  assert len(pieces) > 3 and tok.decode(pieces) == "rhombuses"
  assert [i for i in tok.encode("\u2603\u2603") if i] == [101, 100, 102]  # [UNK]
  assert (tok.encode("Caf\u00e9") == tok.encode("cafe")).all()  # Accents stripped (uncased).
  clip = tokenizers.make("clip", 77)
  assert clip.decode(clip.encode("a red circle")) == "a red circle" and clip.vocab_size == 49408
  assert tok.name != clip.name and tokenizers.make("wordpiece", 9).name != tok.name


def test_bad_specs(tmp_path):
  with pytest.raises(ValueError, match="max_len"):
    tokenizers.make("wordpiece", 1)
  with pytest.raises(tokenizers.TokenizerError, match="unknown tokenizer"):
    tokenizers.make("sentencepiece", 8)
  with pytest.raises(tokenizers.TokenizerError, match="not found"):
    tokenizers.make(f"wordpiece:{tmp_path}/nope.json", 8)
  bad = tmp_path / "tokenizer.json"
  bad.write_text("{not json")
  with pytest.raises(tokenizers.TokenizerError, match="not a HF tokenizer.json"):
    tokenizers.make(f"wordpiece:{bad}", 8)
  with pytest.raises(tokenizers.TokenizerError, match="vocab.json and merges.txt"):
    tokenizers.make(f"clip:{tmp_path}", 77)
  assert tokenizers.check_spec("clip") is None and "no tokenizer file" in tokenizers.check_spec("clip:/nope")


def test_search_path_tokenizes_without_tensorflow_or_jax():
  """What the search CLI imports to tokenize a query pulls in neither TensorFlow, JAX nor torch."""
  code = ("import sys, export.search; from mcad_jax.data import tokenizer as t; "
          "t.make('clip', 77).encode_batch(['a']); t.make('wordpiece', 8).encode_batch(['a']); "
          "print([m for m in ('tensorflow', 'jax', 'torch') if m in sys.modules])")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                     env={**os.environ, "PYTHONPATH": ROOT})
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == "[]"
