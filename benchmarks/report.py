"""Shared by the benchmarks: a median timer, the host's CPU in words, and writing a table between
markers in a markdown file."""

from __future__ import annotations

import os
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_section(filename: str, name: str, heading: str, body: list[str]) -> str:
  """Replaces the `<!-- name:begin/end -->` section of ROOT/filename (appending it under
  `heading` the first time) with `body`; returns the section's text."""
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  table = "\n".join([begin, *body, end])
  path = os.path.join(ROOT, filename)
  text = open(path).read() if os.path.exists(path) else ""
  if begin in text:
    text = text[:text.index(begin)] + table + text[text.index(end) + len(end):]
  else:
    text = text.rstrip() + f"\n\n## {heading}\n\n" + table + "\n"
  with open(path, "w") as f:
    f.write(text)
  return table


def cpu_words() -> str:
  """The CPU's model name and its int8 dot-product extensions (from /proc/cpuinfo), e.g. 'AMD EPYC,
  AVX-512 VNNI': int8 kernels run several times faster with them, so a table measured on
  another host is not comparable by time."""
  try:
    info = open("/proc/cpuinfo").read()
  except OSError:
    return "CPU model unknown"
  field = lambda key: next((line.split(":", 1)[1].strip() for line in info.splitlines()
                            if line.startswith(key)), "")
  flags = set(field("flags").split())
  ext = [name for flag, name in (("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
                                 ("amx_int8", "AMX-INT8")) if flag in flags]
  return ", ".join([field("model name") or "CPU model unknown"] + (ext or ["no VNNI"]))


def median_ms(fn, reps: int, warmup: int = 5) -> float:
  """Median wall time of fn() in ms over `reps` calls, after `warmup` untimed ones.

  fn must block until its work is done (e.g. jax.block_until_ready).
  """
  for _ in range(warmup):
    fn()
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return 1e3 * float(np.median(ts))


def medians_in_turns(fns: dict, reps: int, warmup: int = 5) -> dict:
  """Median wall time in ms of each of `fns` (name -> fn()), the calls taking turns: round r
  times one call of each. On a shared machine a burst of load then hits every contender alike,
  so their ratios hold better than from one timed loop after another."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  ts = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      t = time.perf_counter()
      fn()
      ts[name].append(time.perf_counter() - t)
  return {name: 1e3 * float(np.median(t)) for name, t in ts.items()}
