"""BLIP single-stream teacher: our linen model vs transformers' BlipForImageTextRetrieval (random init)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcad_jax import convert
from mcad_jax.data import tokenizer as tokenizers
from tests import torch_refs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch_refs.torchvision_on_cpu_torch()

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CAPTIONS = ["a large red circle to the left of a small blue square", "two green stars",
            "A picture of a DOG; running!", "x", "日本語のキャプション, café"]


def small_blip(seed: int = 0, image_size: int = 32, max_pos: int = 40):
  """A random-init BLIP ITM model from a small BlipConfig (no download), in eval mode."""
  torch.manual_seed(seed)
  cfg = transformers.BlipConfig(
      vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         image_size=image_size, patch_size=8),
      text_config=dict(vocab_size=30524, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, encoder_hidden_size=64, max_position_embeddings=max_pos),
      image_text_hidden_size=32)
  model = transformers.BlipForImageTextRetrieval(cfg).eval()
  # HF's init leaves the ViT's [CLS] output constant (~0 after its LayerNorm) and the ITC
  # projections ~0, so that ITC would compare noise; real checkpoints are not like that.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name.lower() and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.05)
  return model, cfg


def test_blip_matches_transformers():
  from mcad_jax.models.blip import BlipTeacher

  ref, cfg = small_blip()
  sd = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}
  kw = convert.blip_model_kwargs(sd, cfg.to_dict())
  assert kw["image_size"] == 32 and kw["text_len"] == 40 and kw["text_kw"]["heads"] == 2
  L = 24
  model = BlipTeacher(image={**kw["image_kw"], "mean": CLIP_MEAN, "std": CLIP_STD},
                      text={k: v for k, v in kw["text_kw"].items()} | {"max_len": L},
                      embed_dim=kw["embed_dim"])
  params = jax.tree.map(jnp.asarray, convert.blip_model(sd, L, 2, 2))
  ids = tokenizers.make("wordpiece", L).encode_batch(CAPTIONS)
  mask = (ids != 0).astype(np.int64)
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (len(ids), 32, 32, 3)).astype(np.float32)
  x = (pixels / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
  pv = torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float32)
  it, am = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)
  with torch.no_grad():
    itm = ref(input_ids=it, pixel_values=pv, attention_mask=am, use_itm_head=True)
    ref_logits = itm.itm_score.numpy()
    ref_fused = itm.question_embeds[:, 0].numpy()
    img_embeds = ref.vision_model(pixel_values=pv).last_hidden_state
    ref_zimg = torch.nn.functional.normalize(ref.vision_proj(img_embeds[:, 0]), dim=-1).numpy()
    txt = ref.text_encoder(input_ids=it, attention_mask=am).last_hidden_state
    ref_ztxt = torch.nn.functional.normalize(ref.text_proj(txt[:, 0]), dim=-1).numpy()
    ref_itc = ref(input_ids=it, pixel_values=pv, attention_mask=am, use_itm_head=False).itm_score.numpy()

  f, got_itm, aux = model.apply({"params": params}, pixels, ids)
  errs = {
      "itm": np.abs(np.asarray(got_itm) - (ref_logits[:, 1] - ref_logits[:, 0])).max(),
      "fused": np.abs(np.asarray(f) - ref_fused).max(),
      "zimg": np.abs(np.asarray(aux["zimg"]) - ref_zimg).max(),
      "ztxt": np.abs(np.asarray(aux["ztxt"]) - ref_ztxt).max(),
      "itc": np.abs(np.asarray(aux["zimg"]) @ np.asarray(aux["ztxt"]).T - ref_itc).max(),
  }
  print("BLIP max abs error vs transformers:", {k: f"{v:.1e}" for k, v in errs.items()})
  assert max(errs.values()) <= 1e-4, errs
  assert np.abs(ref_logits[:, 1] - ref_logits[:, 0]).max() > 1e-3  # Not a vacuous comparison.
  # The FusionTeacher interface the fusion stage, MCAD and the cache use: pair() on unimodal tokens.
  _, _, u = model.apply({"params": params}, pixels, ids, method=model.unimodal)
  f2, itm2 = model.apply({"params": params}, u["img"]["ctx"], u["txt"]["tokens"], u["txt"]["mask"],
                         method=model.pair)
  np.testing.assert_allclose(np.asarray(itm2), np.asarray(got_itm), atol=1e-6)


def test_blip_converter_names_mismatches(tmp_path):
  ref, _ = small_blip()
  sd = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}
  with pytest.raises(convert.WeightsError, match="not a BLIP"):
    convert.blip_model({k: v for k, v in sd.items() if not k.startswith("itm_head")}, 24, 2, 2)
  with pytest.raises(convert.WeightsError, match="exceeds"):
    convert.blip_model(sd, 64, 2, 2)
