"""Pretrained weights -> linen: MiniLM (real weights) and open_clip (random init) against torch."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcad_jax import convert
from mcad_jax.data import tokenizer as tokenizers
from mcad_jax.models.text import TextTransformer
from tests import torch_refs

torch = pytest.importorskip("torch")
torch_refs.torchvision_on_cpu_torch()


CAPTIONS = ["a large red circle to the left of a small blue square",
            "two green stars", "A picture of a DOG; running!", "x"]


def test_minilm_matches_torch_bert():
  transformers = pytest.importorskip("transformers")
  d = convert.minilm_dir()
  cfg = convert.bert_config(d)
  tok = tokenizers.make("wordpiece", 32)
  ids = tok.encode_batch(CAPTIONS)
  mask = (ids != 0).astype(np.int64)
  os.environ["HF_HUB_OFFLINE"] = "1"
  ref_model = transformers.BertModel.from_pretrained(d).eval()
  with torch.no_grad():
    hidden = ref_model(input_ids=torch.tensor(ids, dtype=torch.long),
                       attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  ref = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)  # sentence-transformers pooling

  kw = convert.bert_text_kwargs(cfg, gelu_exact=True)
  model = TextTransformer(vocab_size=cfg["vocab_size"], max_len=32, **kw)
  params = jax.tree.map(jnp.asarray, convert.bert_text(
      convert.read_state_dict(os.path.join(d, "model.safetensors")), 32, kw["heads"]))
  pooled, aux = model.apply({"params": params}, ids)
  err = float(np.abs(np.asarray(pooled) - ref).max())
  print(f"MiniLM-L6 max abs error vs torch: {err:.2e}")
  assert err <= 1e-4
  tok_err = float(np.abs((np.asarray(aux["tokens"]) - hidden) * mask[..., None]).max())
  assert tok_err <= 1e-4
  # The export-friendly tanh GELU changes the features only slightly (then fine-tuning adapts).
  approx = TextTransformer(vocab_size=cfg["vocab_size"], max_len=32, **{**kw, "gelu_exact": False})
  got = np.asarray(approx.apply({"params": params}, ids)[0])
  cos = np.sum(got * ref, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
  assert cos.min() > 0.999


def test_minilm_as_student_init_option(tmp_path):
  """`<stage>.pretrained='minilm-l6'` puts the real weights into a fresh student's text tower."""
  from configs import shapes
  from mcad_jax import config_lib, sharding, stages

  config = shapes.get_config("smoke")
  config.distill.model.text = "S"
  config.distill.model.text_kw = config_lib.minilm_text_kw()
  config.distill.pretrained = "minilm-l6"
  config.distill.recipe = "student_only"
  config.stages = ("distill",)
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  st = stages.build(config, "distill", str(tmp_path), mesh)
  params = st.load_init(jax.jit(st.init)(jax.random.key(0)))
  sd = convert.read_state_dict(os.path.join(convert.minilm_dir(), "model.safetensors"))
  np.testing.assert_array_equal(params["student"]["txt"]["token_embedding"],
                                sd["embeddings.word_embeddings.weight"])
  q = sd["encoder.layer.3.attention.self.query.weight"]
  np.testing.assert_array_equal(
      np.asarray(params["student"]["txt"]["encoder"]["block3"]["attn"]["query"]["kernel"]).reshape(384, 384),
      q.T)
  config.distill.model.text_kw = {"depth": 2}  # Wrong architecture: a clear error, not half a load.
  st = stages.build(config, "distill", str(tmp_path), mesh)
  with pytest.raises(convert.WeightsError, match="do not fit"):
    st.load_init(jax.jit(st.init)(jax.random.key(0)))


def test_bad_checkpoint_files(tmp_path):
  with pytest.raises(convert.WeightsError, match="no such"):
    convert.read_state_dict(str(tmp_path / "nope.safetensors"))
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"garbage")
  with pytest.raises(convert.WeightsError, match="safetensors"):
    convert.read_state_dict(str(bad))
  # A pickle that is not plain tensors is refused by weights_only loading.
  evil = tmp_path / "evil.pt"
  torch.save({"x": torch.zeros(2), "obj": object()}, evil)
  with pytest.raises(convert.WeightsError, match="weights_only"):
    convert.read_state_dict(str(evil))


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def test_open_clip_vit_b32_matches_torch():
  """Random-init open_clip ViT-B-32 -> TwoTower; both towers and the tokenizer agree with torch."""
  open_clip = pytest.importorskip("open_clip")
  from mcad_jax.models.two_tower import TwoTower

  torch.manual_seed(0)
  ref = open_clip.create_model("ViT-B-32", pretrained=None).eval()
  sd = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}
  kw = convert.clip_model_kwargs(sd)
  assert kw["image_size"] == 224 and kw["text_len"] == 77 and kw["embed_dim"] == 512

  ids = tokenizers.make("clip", 77).encode_batch(CAPTIONS + ["&amp; an  html   entity", "word " * 100])
  want_ids = open_clip.tokenize(CAPTIONS + ["&amp; an  html   entity", "word " * 100]).numpy()
  np.testing.assert_array_equal(ids, want_ids)

  model = TwoTower(image={**kw["image_kw"], "gelu_exact": True, "mean": CLIP_MEAN, "std": CLIP_STD},
                   text={**kw["text_kw"], "gelu_exact": True, "vocab_size": kw["vocab_size"],
                         "max_len": kw["text_len"]},
                   embed_dim=kw["embed_dim"])
  params = jax.tree.map(jnp.asarray, convert.open_clip_model(sd))
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (2, 224, 224, 3)).astype(np.float32)
  zimg, ztxt, aux = model.apply({"params": params}, pixels, ids[:4])
  x = (pixels / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
  with torch.no_grad():
    ref_img = ref.encode_image(torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float32),
                               normalize=True).numpy()
    ref_txt = ref.encode_text(torch.tensor(want_ids[:4]), normalize=True).numpy()
  err_i = float(np.abs(np.asarray(zimg) - ref_img).max())
  err_t = float(np.abs(np.asarray(ztxt) - ref_txt).max())
  print(f"open_clip ViT-B-32 max abs error vs torch: image {err_i:.2e}, text {err_t:.2e}")
  assert err_i <= 1e-4 and err_t <= 1e-4
  assert float(aux["logit_scale"]) == pytest.approx(float(ref.logit_scale.detach().exp()), rel=1e-6)


def test_openclip_as_teacher_init_option(tmp_path):
  """`<stage>.pretrained='openclip:PATH'` with the CLIP tokenizer: a whole teacher from a checkpoint."""
  open_clip = pytest.importorskip("open_clip")
  from configs import shapes
  from mcad_jax import config_lib, sharding, stages

  torch.manual_seed(1)
  ref = open_clip.create_model("ViT-B-32", pretrained=None)
  path = tmp_path / "vit_b32.pt"
  torch.save(ref.state_dict(), path)
  kw = convert.clip_model_kwargs(convert.read_state_dict(str(path)))
  config = shapes.get_config("smoke")
  config.data.tokenizer = "clip"
  config.data.image_size, config.data.text_len = kw["image_size"], kw["text_len"]
  config.teacher.model = config_lib.model_config(
      "B/32", "M", kw["embed_dim"], mean=CLIP_MEAN, std=CLIP_STD,
      image_kw={**kw["image_kw"], "gelu_exact": True}, text_kw={**kw["text_kw"], "gelu_exact": True})
  config.teacher.pretrained = f"openclip:{path}"
  config.stages = ("teacher",)
  config_lib.validate(config)
  tok = stages.tokenizer(config)
  assert tok.vocab_size == kw["vocab_size"] == 49408
  assert tok.decode(tok.encode("a red circle")) == "a red circle"
  mesh = sharding.make_mesh(config.mesh)
  st = stages.build(config, "teacher", str(tmp_path), mesh)
  params = st.load_init(jax.jit(st.init)(jax.random.key(0)))
  np.testing.assert_array_equal(params["txt"]["token_embedding"], ref.token_embedding.weight.detach().numpy())
  np.testing.assert_allclose(params["log_scale"], ref.logit_scale.detach().numpy(), rtol=1e-7)
