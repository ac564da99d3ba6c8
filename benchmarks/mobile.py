"""On-device costs of the exported student: LiteRT beside ONNX Runtime, at 1 and 4 threads.

  python -m benchmarks.mobile --workdir workdirs/demo [--reps 200] [--threads 1 4] [--write]
  python -m benchmarks.mobile --workdir workdirs/paper_t2 --reps 30 --write --section mobile_paper

For the encoders of a finished export stage (W/export/), one run, same inputs:
- text-query latency (tokenize + encode) and image-encode latency, median of single-example
  calls (at 1 thread every engine loaded and their calls taking turns, so load on a shared
  machine hits them alike; at more threads one engine after another), for LiteRT (XNNPACK)
  fp32 / fp16 / int8 TFLite files (and the static full-integer `npu` / `npu_per_tensor` files when
  the export made them: NPU files, timed here on the CPU's int8 kernels) and for ONNX Runtime
  (CPU) on our jax2onnx files in fp32 and after ORT's own dynamic int8 quantization
  (`onnxruntime.quantization.quantize_dynamic`, what an ORT user would do), at each thread count;
  ratios to ORT fp32 at the same thread count;
- file sizes;
- peak RSS of a text-to-image query process (the int8 text encoder and a 100k-entry int8
  gallery, answering queries) with the gallery held in memory and with it streamed from its file
  at each query (`--memory stream`), of one that also loads the image encoder, and of one that
  imports the runtime and loads nothing, each a fresh subprocess;
- brute-force search latency over 10k and 100k embeddings (fp16 and int8 index), and over the
  100k int8 file streamed.
The galleries are random unit vectors: search cost does not depend on the values. With --write
the tables replace the section between the markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks.report import cpu_words, median_ms, medians_in_turns

QUERY = "a large red circle to the left of a small blue square"
GALLERY = 100_000
# (runtime, format): LiteRT's three TFLite files, ONNX Runtime's fp32 file and its own int8;
# then the static full-integer NPU files, where the export made them (timed on the CPU here).
ENGINES = (("litert", "fp32"), ("litert", "fp16"), ("litert", "int8"), ("ort", "fp32"),
           ("ort", "int8"))
NPU_ENGINES = (("litert", "npu"), ("litert", "npu_per_tensor"))


def child(workdir: str, what: str, gallery: str) -> dict:
  """Peak RSS of a query process, loading `what`: 'none' (the runtime: LiteRT, the tokenizer,
  faiss when installed; no model), 'text' (a text-to-image query process: the int8 text encoder
  and a 100k int8 gallery opened the way the search CLI opens it, answering queries), 'stream'
  (the same with the gallery streamed: `--memory stream`) or 'both' (as 'text', plus the int8
  image encoder, run once).

  Read from /proc's VmHWM, which starts afresh at exec (getrusage's ru_maxrss would
  inherit the forking parent's peak).
  """
  import ai_edge_litert.interpreter  # noqa: F401  (the runtime)

  from export import index, runtime
  from mcad_jax.data import tokenizer as tokenizers

  if index.has_faiss():
    import faiss  # noqa: F401
  out = os.path.join(workdir, "export")
  meta = json.load(open(os.path.join(out, "meta.json")))
  tok = tokenizers.make(meta.get("tokenizer", "wordpiece"), meta["text_len"])
  if what != "none":
    txt = runtime.TFLiteEncoder(os.path.join(out, "student_text_int8.tflite"))
    ix = index.open_for_search(gallery, "stream" if what == "stream" else "resident")
    if what == "both":
      s = meta["image_size"]
      runtime.TFLiteEncoder(os.path.join(out, "student_image_int8.tflite"))(
          np.zeros((1, s, s, 3), np.float32))
    for _ in range(20):
      ix.search(txt(tok.encode_batch([QUERY])), 10)  # The CLI's path (faiss if installed).
  with open("/proc/self/status") as f:
    hwm_kib = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
  return {"peak_rss_mib": hwm_kib / 1024}


def ort_int8(src: str, dst: str) -> str:
  """ONNX Runtime's own dynamic int8 quantization of one of our .onnx files."""
  from onnxruntime.quantization import QuantType, quantize_dynamic

  quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
  return dst


def encoders(out: str, engine: tuple[str, str], threads: int, tmp: str):
  """(text, image) encoders of `engine`; ORT's int8 files are the ones `main` wrote into tmp."""
  from export import runtime

  rt, fmt = engine
  if rt == "litert":
    return tuple(runtime.TFLiteEncoder(os.path.join(out, f"student_{e}_{fmt}.tflite"), threads)
                 for e in ("text", "image"))
  d = tmp if fmt == "int8" else out
  return tuple(runtime.OnnxEncoder(os.path.join(d, f"student_{e}.onnx"), threads)
               for e in ("text", "image"))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", default="workdirs/demo")
  ap.add_argument("--reps", type=int, default=200)
  ap.add_argument("--threads", type=int, nargs="+", default=[1, 4])
  ap.add_argument("--write", action="store_true")
  ap.add_argument("--section", default="mobile", help="BENCHMARKS.md section to replace")
  ap.add_argument("--child", help=argparse.SUPPRESS)
  ap.add_argument("--gallery", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    print(json.dumps(child(args.workdir, args.child, args.gallery)))
    return

  from export import index
  from mcad_jax.data import tokenizer as tokenizers

  out = os.path.join(args.workdir, "export")
  meta = json.load(open(os.path.join(out, "meta.json")))
  tok = tokenizers.make(meta.get("tokenizer", "wordpiece"), meta["text_len"])
  s = meta["image_size"]
  image = np.random.default_rng(0).integers(0, 256, (1, s, s, 3)).astype(np.float32)
  tmp = tempfile.mkdtemp(prefix="mcad_mobile_")
  engines = ENGINES + tuple(e for e in NPU_ENGINES
                            if os.path.isfile(os.path.join(out, f"student_text_{e[1]}.tflite")))
  for e in ("text", "image"):
    ort_int8(os.path.join(out, f"student_{e}.onnx"), os.path.join(tmp, f"student_{e}.onnx"))
  lat, sizes = {}, {}
  for n in args.threads:
    encs = {engine: encoders(out, engine, n, tmp) for engine in engines}
    calls = {}
    for engine, (txt, img) in encs.items():
      calls[engine, "text"] = lambda t=txt: t(tok.encode_batch([QUERY]))
      calls[engine, "image"] = lambda i=img: i(image)
      sizes[engine] = (os.path.getsize(txt.path), os.path.getsize(img.path))
    # One thread: the calls take turns. More: one engine after another, since a thread pool
    # spinning after its call (ORT's default) would slow whichever engine ran next.
    ms = (medians_in_turns(calls, args.reps) if n == 1 else
          {key: median_ms(fn, args.reps) for key, fn in calls.items()})
    for engine in engines:
      lat[engine, n] = ms[engine, "text"], ms[engine, "image"]
    emb_dim = calls[ENGINES[0], "text"]().shape[1]
    del encs, calls
  tokenize_ms = median_ms(lambda: tok.encode_batch([QUERY]), args.reps)

  rng = np.random.default_rng(0)
  q = rng.standard_normal((1, emb_dim)).astype(np.float32)
  q /= np.linalg.norm(q)
  search = {}
  for n in (10_000, GALLERY):
    g = rng.standard_normal((n, emb_dim)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    for dtype in ("fp16", "int8"):
      ix = index.Index.build(g, dtype)
      search[(n, dtype)] = (median_ms(lambda i=ix: i.search(q, 10),
                                      max(20, args.reps // 4)), ix.rows.nbytes)
      if n == GALLERY and dtype == "int8":
        gallery = os.path.join(tmp, "gallery_100k_int8.idx")
        ix.save(gallery)
        streamed = index.open_for_search(gallery, "stream")
        stream_ms = medians_in_turns({"resident": lambda i=ix: i.search(q, 10),
                                      "stream": lambda i=streamed: i.search(q, 10)},
                                     max(20, args.reps // 4))
  rss = {fmt: json.loads(subprocess.run(
      [sys.executable, "-m", "benchmarks.mobile", "--workdir", args.workdir, "--child", fmt,
       "--gallery", gallery],
      capture_output=True, text=True, check=True).stdout)["peak_rss_mib"]
      for fmt in ("text", "stream", "both", "none")}
  shutil.rmtree(tmp)  # ORT's int8 files and the 100k gallery.

  name = lambda e: f"{'LiteRT' if e[0] == 'litert' else 'ONNX Runtime'} {e[1]}"
  lines = [
      f"`python -m benchmarks.mobile --workdir {args.workdir} --reps {args.reps} --threads "
      f"{' '.join(map(str, args.threads))}{'' if args.section == 'mobile' else ' --section ' + args.section}"
      f" --write` on {platform.machine()} ({cpu_words()}), {os.cpu_count()} cores (not a "
      f"phone); median of "
      f"{args.reps} single-example calls (at 1 thread the engines taking turns call by call, at "
      f"more one after another); LiteRT with XNNPACK, ONNX Runtime's CPU provider. Student "
      f"of that workdir: image {s} px, {meta['text_len']} tokens, {emb_dim}-d embeddings. Tokenizing "
      f"the query: {tokenize_ms:.3f} ms (included in the text rows).",
      "",
      "| runtime, weights | threads | text query (ms) | image encode (ms) | text ÷ ORT fp32 "
      "| image ÷ ORT fp32 | text file (MB) | image file (MB) |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for engine in engines:
    for n in args.threads:
      (t, i), (rt, ri) = lat[engine, n], lat[("ort", "fp32"), n]
      lines.append(f"| {name(engine)} | {n} | {t:.3f} | {i:.3f} | {t / rt:.2f} | {i / ri:.2f} "
                   f"| {sizes[engine][0] / 1e6:.2f} | {sizes[engine][1] / 1e6:.2f} |")
  lines += [
      "",
      f"Peak RSS of a text-to-image query process (the int8 text encoder and a {GALLERY:,}-entry "
      f"int8 gallery, {GALLERY * emb_dim / 2**20:.0f} MiB of codes, answering queries): "
      f"**{rss['text']:.0f} MiB**; with the gallery streamed from its file at each query instead "
      f"(`--memory stream`, one {index.BLOCK_BYTES >> 20} MiB block held at a time): "
      f"**{rss['stream']:.0f} MiB**; gallery in memory and the int8 image encoder loaded too: "
      f"{rss['both']:.0f} MiB; the same Python process with the runtime imported (LiteRT, the "
      f"tokenizer, NumPy, faiss) but no model or gallery: {rss['none']:.0f} MiB.",
      "",
      "| gallery | fp16 index: search (ms) | fp16 size (MB) | int8 index: search (ms) | int8 size (MB) "
      "| int8 / fp16 time |",
      "|---|---|---|---|---|---|",
  ]
  for n in (10_000, GALLERY):
    (t16, b16), (t8, b8) = search[(n, "fp16")], search[(n, "int8")]
    lines.append(f"| {n:,} | {t16:.2f} | {b16 / 1e6:.1f} | {t8:.2f} | {b8 / 1e6:.1f} | {t8 / t16:.2f} |")
  lines += ["", f"The {GALLERY:,} int8 gallery streamed from its file (`--memory stream`, the file in "
            f"the page cache): {stream_ms['stream']:.2f} ms per search against {stream_ms['resident']:.2f}"
            f" ms held in memory (the two taking turns), "
            f"{stream_ms['stream'] / stream_ms['resident']:.2f} ×."]
  lines += ["", "Context, not a comparison: the MCAD paper reports about 8 ms per search and about "
            "100 MB of memory for its student on phones; the numbers above are an x86 server core "
            "running the same interpreters."]
  print("\n".join(lines))
  if args.write:
    from benchmarks.report import write_section

    write_section("BENCHMARKS.md", args.section, "On-device costs", lines)


if __name__ == "__main__":
  main()
