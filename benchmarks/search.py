"""Search at scale: top-10 over a 1M gallery on one core, our index beside faiss-cpu, same run.

  python -m benchmarks.search [--n 1000000] [--dim 64] [--queries 100] [--reps 20] [--write]

A gallery of `n` random unit vectors of the student's embedding width, and
`queries` queries of two kinds: random unit vectors (the hardest case for
recall: the top scores are bunched) and near-duplicates of gallery rows
(gallery row + noise, a query with a clear best match). For each searcher:
top-10 latency of one query at a time on one core (median over `reps` queries,
faiss and BLAS held to one thread), peak RSS of a fresh process that loads the
gallery and answers queries (minus that of a process that imports the same
libraries and loads nothing), and recall@10 against the exact float top-10.
Searchers: our int8 and fp16 index files (export/index.py) through faiss and
through numpy (the no-faiss fallback), the int8 file re-ranked by the fp16 file
read row by row (its top 100 scored again: the CLI's path), the same with the int8
file streamed from disk at each query (`--memory stream`), faiss IndexFlatIP on
float32 rows, and faiss's own 8-bit scalar quantizer (QT_8bit, trained on the
gallery). With --write the table goes into BENCHMARKS.md.
"""

from __future__ import annotations

import os
import sys

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ[_v] = "1"  # One core, set before numpy and faiss load their thread pools.

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

SEARCHERS = ("ours_int8_faiss", "ours_int8_rerank", "ours_int8_stream", "ours_int8_numpy",
             "ours_fp16_faiss", "faiss_flat", "faiss_sq8")


def gallery(n: int, dim: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  g = np.empty((n, dim), np.float32)
  for a in range(0, n, 1 << 17):  # In blocks: the float64 draw of 1M rows would double the peak.
    b = rng.standard_normal((min(n - a, 1 << 17), dim), dtype=np.float32)
    g[a:a + len(b)] = b / np.linalg.norm(b, axis=1, keepdims=True)
  return g


def queries(g: np.ndarray, m: int, seed: int = 1) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  rand = rng.standard_normal((m, g.shape[1])).astype(np.float32)
  near = g[rng.choice(len(g), m, replace=False)] + 0.5 * rand / np.sqrt(g.shape[1])
  return {k: v / np.linalg.norm(v, axis=1, keepdims=True) for k, v in (("random", rand), ("near", near))}


def make(name: str, tmp: str):
  """A search function q [1, E] -> top-10 ids, for searcher `name`, from the files in tmp."""
  import faiss

  from export import index

  faiss.omp_set_num_threads(1)
  if name.startswith("ours"):
    path = os.path.join(tmp, f"g_{name.split('_')[1]}.idx")
    use = not name.endswith("numpy")
    # As the search CLI opens it (faiss's codes the one copy, or streamed from the file); the
    # numpy fallback as a process without faiss holds it (the rows, and their float copy).
    ix = (index.open_for_search(path, "stream" if name.endswith("stream") else "resident") if use
          else index.Index.load(path))
    rr = (index.Index.load(os.path.join(tmp, "g_fp16.idx"), lazy=True)
          if name.endswith(("rerank", "stream")) else None)
    ix.search(np.zeros((1, ix.rows.shape[1]), np.float32), 10, use_faiss=use)  # Builds its caches.
    return lambda q: ix.search(q, 10, use_faiss=use, rerank=rr)[0]
  n, dim = np.load(os.path.join(tmp, "g.npy"), mmap_mode="r").shape

  def blocks(limit=n, step=1 << 17):
    # Plain reads, not a memory map, whose pages would count in this process's RSS.
    with open(os.path.join(tmp, "g.npy"), "rb") as f:
      np.lib.format.read_magic(f)
      np.lib.format.read_array_header_1_0(f)
      for a in range(0, limit, step):
        yield np.fromfile(f, np.float32, min(step, limit - a) * dim).reshape(-1, dim)

  if name == "faiss_flat":
    ix = faiss.IndexFlatIP(dim)
  else:
    ix = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    ix.train(next(blocks(200_000, 200_000)))
  for b in blocks():
    ix.add(b)
  return lambda q: ix.search(q, 10)[1]


def child(name: str, tmp: str) -> dict:
  """Peak RSS (VmHWM, which starts afresh at exec) of a process that loads one searcher and queries."""
  import faiss  # noqa: F401

  from export import index  # noqa: F401

  if name != "none":
    fn = make(name, tmp)
    q = np.load(os.path.join(tmp, "q.npy"))
    for x in q[:5]:
      fn(x[None])
  with open("/proc/self/status") as f:
    return {"peak_rss_mib": next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--n", type=int, default=1_000_000)
  ap.add_argument("--dim", type=int, default=64)
  ap.add_argument("--queries", type=int, default=100)
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--write", action="store_true")
  ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    print(json.dumps(child(*args.child)))
    return

  import faiss

  from export import index

  g = gallery(args.n, args.dim)
  qs = queries(g, args.queries)
  exact = {}
  for kind, q in qs.items():  # Exact float top-10, in blocks of the gallery.
    s = np.concatenate([q @ g[a:a + (1 << 17)].T for a in range(0, len(g), 1 << 17)], axis=1)
    exact[kind] = np.argsort(-s, axis=1)[:, :10]
    del s
  rows = {}
  with tempfile.TemporaryDirectory() as tmp:
    np.save(os.path.join(tmp, "g.npy"), g)
    np.save(os.path.join(tmp, "q.npy"), qs["random"])
    for dt in ("int8", "fp16"):
      index.Index.build(g, dt).save(os.path.join(tmp, f"g_{dt}.idx"))
    del g
    base = json.loads(subprocess.run([sys.executable, "-m", "benchmarks.search", "--child", "none", tmp],
                                     capture_output=True, text=True, check=True).stdout)
    fns = {name: make(name, tmp) for name in SEARCHERS}
    for name, fn in fns.items():
      rec = {kind: float(np.mean([len(set(fn(q[None])[0]) & set(exact[kind][i])) / 10
                                  for i, q in enumerate(qs[kind])])) for kind in qs}
      rows[name] = {"recall": rec, "ts": []}
    # Round robin, one query each in turn: load from other processes on this shared machine then
    # hits every searcher alike.
    for x in qs["random"][:args.reps]:
      for name, fn in fns.items():
        t = time.perf_counter()
        fn(x[None])
        rows[name]["ts"].append(time.perf_counter() - t)
    del fns
    for name, r in rows.items():
      rss = json.loads(subprocess.run([sys.executable, "-m", "benchmarks.search", "--child", name, tmp],
                                      capture_output=True, text=True, check=True).stdout)
      r["ms"], r["mib"] = 1e3 * float(np.median(r.pop("ts"))), rss["peak_rss_mib"] - base["peak_rss_mib"]
      print(name, r, flush=True)
  flat = rows["faiss_flat"]["ms"]
  desc = {"ours_int8_faiss": "ours, int8 file, via faiss",
          "ours_int8_rerank": "ours, int8 file via faiss, top 100 re-ranked by the fp16 file "
                              "read row by row (the CLI)",
          "ours_int8_stream": "the same, the int8 file streamed at each query (the CLI with "
                              "`--memory stream`)",
          "ours_int8_numpy": "ours, int8 file, numpy fallback",
          "ours_fp16_faiss": "ours, fp16 file, via faiss",
          "faiss_flat": "faiss IndexFlatIP, float32", "faiss_sq8": "faiss IndexScalarQuantizer QT_8bit"}
  lines = [f"`python -m benchmarks.search --n {args.n} --dim {args.dim} --queries {args.queries} "
           f"--reps {args.reps} --write` on {platform.machine()} ({os.cpu_count()} cores, shared, "
           f"one thread used), faiss-cpu {faiss.__version__}: {args.n:,} random unit vectors of width "
           f"{args.dim}, top-10 of one query at a time (median of {args.reps}, the searchers taking "
           "turns); memory is the peak RSS of a process that loads that searcher and queries, minus "
           "a process that loads nothing; "
           "recall@10 vs the exact float top-10 over "
           f"{args.queries} random queries and {args.queries} near-duplicate queries.",
           "",
           "| searcher | top-10 (ms) | ÷ faiss flat | memory (MiB) | recall@10, random q | "
           "recall@10, near-dup q |",
           "|---|---|---|---|---|---|"]
  for name, r in rows.items():
    lines.append(f"| {desc[name]} | {r['ms']:.1f} | {r['ms'] / flat:.2f} | {r['mib']:.0f} | "
                 f"{r['recall']['random']:.3f} | {r['recall']['near']:.3f} |")
  print("\n".join(lines))
  if args.write:
    from benchmarks.report import write_section

    write_section("BENCHMARKS.md", "search", "Search at scale (1M gallery, one core)", lines)


if __name__ == "__main__":
  main()
