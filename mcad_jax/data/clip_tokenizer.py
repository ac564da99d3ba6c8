"""CLIP's byte-level BPE tokenizer (for teachers converted from open_clip / OpenAI CLIP).

Our own implementation of the published scheme: text is cleaned (ftfy if
installed, HTML unescaped, whitespace collapsed, lower-cased), split by CLIP's
regex into words, each word's UTF-8 bytes mapped to printable characters and
merged by the BPE merge list, with '</w>' marking a word's end. A sequence is
[<|startoftext|>] tokens [<|endoftext|>], zero-padded to the context length;
a long one is cut and still ends in <|endoftext|> (the text tower pools there,
`pool='eot'`: the largest id). The merge list (`bpe_simple_vocab_16e6.txt.gz`)
is not shipped here: it is read from the installed `open_clip` package, or a
path you give.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import os

import numpy as np

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
  """A reversible map of the 256 byte values to printable unicode characters.

  Order matters, since the vocab is built from it: the printable bytes first (as
  themselves), then the others in byte order, mapped to 256, 257, ...
  """
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  table = {b: chr(b) for b in keep}
  for n, b in enumerate(b for b in range(256) if b not in table):
    table[b] = chr(256 + n)
  return table


def default_bpe_path() -> str:
  try:
    root = importlib.resources.files("open_clip")
  except ModuleNotFoundError as e:
    raise FileNotFoundError("CLIP's BPE merges come with open_clip (pip install open-clip-torch), "
                            "or pass bpe_path=") from e
  return str(root / "bpe_simple_vocab_16e6.txt.gz")


class ClipTokenizer:
  """ids [N, context_length] int32 for a list of strings, CLIP style."""

  def __init__(self, context_length: int = 77, bpe_path: str | None = None):
    import regex

    path = bpe_path or default_bpe_path()
    if not os.path.isfile(path):
      raise FileNotFoundError(f"CLIP BPE merges not found: {path}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")[1:NUM_MERGES + 1]
    merges = [tuple(ln.split()) for ln in lines]
    chars = list(byte_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
    self.encoder = {t: i for i, t in enumerate(vocab)}
    self.rank = {m: i for i, m in enumerate(merges)}
    self.sot, self.eot = self.encoder[SOT], self.encoder[EOT]
    self.context_length = context_length
    self.pattern = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE)
    self._cache: dict[str, list[str]] = {SOT: [SOT], EOT: [EOT]}

  def _bpe(self, word: str) -> list[str]:
    if word in self._cache:
      return self._cache[word]
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
      pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
      best = min(pairs, key=lambda p: self.rank.get(p, float("inf")))
      if best not in self.rank:
        break
      merged, i = [], 0
      while i < len(parts):
        if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    self._cache[word] = parts
    return parts

  @staticmethod
  def clean(text: str) -> str:
    try:
      import ftfy

      text = ftfy.fix_text(text)
    except ImportError:
      pass
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()

  def bpe_ids(self, text: str) -> list[int]:
    """BPE ids of the cleaned text, without start/end tokens or padding."""
    b2u = byte_to_unicode()
    out = []
    for word in self.pattern.findall(self.clean(text)):
      mapped = "".join(b2u[b] for b in word.encode("utf-8"))
      out.extend(self.encoder[t] for t in self._bpe(mapped))
    return out

  def encode(self, text: str | bytes) -> np.ndarray:
    """[context_length] int32: <|startoftext|> ids <|endoftext|> 0..."""
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    ids = np.zeros(self.context_length, np.int32)
    toks = [self.sot] + self.bpe_ids(text)[: self.context_length - 2] + [self.eot]
    ids[: len(toks)] = toks
    return ids

  def encode_batch(self, texts) -> np.ndarray:
    return np.stack([self.encode(t) for t in texts]) if len(texts) else \
        np.zeros((0, self.context_length), np.int32)

  @property
  def vocab_size(self) -> int:
    return len(self.encoder)

  @property
  def max_len(self) -> int:
    return self.context_length

  def decode(self, ids) -> str:
    """Inverse of `encode` up to cleaning (for logs and the search CLI)."""
    if not hasattr(self, "_decoder"):
      self._decoder = {i: t for t, i in self.encoder.items()}
      self._u2b = {u: b for b, u in byte_to_unicode().items()}
    out = bytearray()
    for i in ids:
      if int(i) in (0, self.sot, self.eot):
        continue
      tok = self._decoder[int(i)]
      end = tok.endswith("</w>")
      out += bytes(self._u2b[c] for c in tok.removesuffix("</w>"))
      if end:
        out += b" "
    return out.decode("utf-8", "replace").strip()
