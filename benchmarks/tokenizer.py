"""Tokenizer throughput (captions/s) beside the demo train step's consumption (examples/s).

  python -m benchmarks.tokenizer [--captions=5000] [--steps=20] [--write]

Measured in one run, on the demo's own training captions (`shapes`, generated):
- our tokenizers (`mcad_jax/data/tokenizer.py`: HF `tokenizers` plus our fixed-length
  policy) one caption at a time, as the input pipeline calls them, and in batches of 256;
- the libraries a user would call instead, on the same captions: transformers'
  BERT tokenizer (`AutoTokenizer` on the same MiniLM files, padding + truncation) and
  `open_clip.tokenize`;
- the demo config's train steps on one device (`benchmarks/train_step.py`): the teacher and
  the student trained alone, examples/s on a fixed batch.
The ratio column is captions/s ÷ the fastest train step's examples/s: above 1 the tokenizer,
on one thread, keeps up with training (a distill batch needs one tokenization per distinct
tokenizer in the run).

With --write the table replaces the section between the markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from benchmarks import report, train_step


def rate(fn, texts, reps: int = 3) -> float:
  """Best-of-reps captions/s of fn(texts)."""
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    fn(texts)
    best = min(best, time.perf_counter() - t)
  return len(texts) / best


def batched(fn, size: int = 256):
  return lambda texts: [fn(texts[i:i + size]) for i in range(0, len(texts), size)]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--captions", type=int, default=5000)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
  args = ap.parse_args()

  from mcad_jax.data import scenes, tokenizer as tokenizers
  from tests import torch_refs

  config = train_step.load_config("configs/shapes.py:demo")
  spec = scenes.SceneSpec()
  texts = [c for i in range(args.captions // 5 + 1) for c in scenes.example(spec, 0, "train", i)["captions"]]
  texts = texts[:args.captions]
  L = config.data.text_len
  wp, clip = tokenizers.make("wordpiece", L), tokenizers.make("clip", 77)

  import transformers

  torch_refs.torchvision_on_cpu_torch()
  import open_clip

  ref_wp = transformers.AutoTokenizer.from_pretrained(os.path.dirname(tokenizers.default_vocab_path()))
  rows = [
      ("ours: wordpiece, one caption at a time", rate(lambda ts: [wp.encode(t) for t in ts], texts)),
      ("ours: wordpiece, batches of 256", rate(batched(wp.encode_batch), texts)),
      ("transformers BERT tokenizer, batches of 256", rate(batched(
          lambda ts: ref_wp(ts, padding="max_length", truncation=True, max_length=L,
                            return_tensors="np")), texts)),
      ("ours: clip (77), one caption at a time", rate(lambda ts: [clip.encode(t) for t in ts], texts)),
      ("ours: clip (77), batches of 256", rate(batched(clip.encode_batch), texts)),
      ("open_clip.tokenize, batches of 256", rate(batched(open_clip.tokenize), texts)),
  ]
  steps = {}
  for name in ("teacher", "distill"):
    if name == "distill":
      config.distill.recipe = "student_only"  # The student's own step, no teacher to load,
      config.distill.hard_columns = False     # and no hard columns: the fastest step to feed.
    steps[name] = train_step.step_throughput(config, name, args.steps)["examples_per_s"]
  fastest = max(steps.values())
  body = [f"`python -m benchmarks.tokenizer --captions={args.captions} --steps={args.steps} --write` "
          f"on {platform.machine()}, {os.cpu_count()} cores: {len(texts)} demo training captions "
          f"(`shapes`, WordPiece length {L}, CLIP 77); one process, best of 3. Train steps: "
          "`configs/shapes.py:demo` on one CPU device, fixed batch.",
          "", "| what | captions/s or examples/s | ÷ fastest train step |", "|---|---|---|"]
  body += [f"| {k} | {v:,.0f} | {v / fastest:.1f} |" for k, v in rows]
  body += [f"| train step: demo {k} ({'student alone' if k == 'distill' else 'dual teacher'}) | "
           f"{v:,.0f} | {v / fastest:.2f} |" for k, v in steps.items()]
  text = "\n".join(body)
  print(text)
  if args.write:
    report.write_section("BENCHMARKS.md", "tokenizer", "Tokenizer throughput vs the train step", body)


if __name__ == "__main__":
  main()
