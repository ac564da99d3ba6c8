"""configs/coco.py through the real pipeline, on TFDS mock data (no download)."""

import numpy as np
import pytest

from configs import coco
from mcad_jax.data import pipeline, tokenizer as tokenizers


def test_coco_pipeline_on_mock_data(tmp_path):
  import tensorflow_datasets as tfds

  config = coco.get_config()
  data = config.data
  data.image_size = 32  # Mock images are tiny; the crop path is the same at 224.
  data.data_dir = str(tmp_path)
  tok = tokenizers.make("wordpiece", data.text_len)
  with tfds.testing.mock_data(num_examples=12):
    it = pipeline.train_iterator(data, tok, 8, seed=0)
    b = next(it)
    assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.uint8
    assert b["text"].shape == (8, 64) and (b["text"][:, 0] == tok.cls_id).all()
    ev = pipeline.eval_set(data, tok)
  assert ev.images.shape == (12, 32, 32, 3)
  assert ev.texts.shape == (60, 64)  # First 5 captions of each image, COCO-5K style.
  assert ev.hard is None


def _small_checkpoints(tmp_path):
  """Random-init checkpoints as a user would bring them: an open_clip CLIP (.pt state dict), a BLIP
  ITM model (.safetensors, with its 30524-id vocab.txt) and a BERT text tower (.safetensors)."""
  import torch
  import transformers
  from safetensors.torch import save_file

  from tests import torch_refs
  from tests.test_blip import small_blip

  torch_refs.torchvision_on_cpu_torch()
  import open_clip

  torch.manual_seed(0)
  clip = open_clip.CLIP(embed_dim=32, vision_cfg=dict(layers=2, width=64, head_width=32, patch_size=16,
                                                      image_size=32),
                        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
  torch.save(clip.state_dict(), tmp_path / "clip.pt")
  blip, _ = small_blip(seed=1, image_size=32)
  save_file({k: v.contiguous() for k, v in blip.state_dict().items()}, str(tmp_path / "blip.safetensors"))
  vocab = open(tokenizers.default_vocab_path()).read().rstrip("\n") + "\n[DEC]\n[ENC]\n"
  (tmp_path / "blip_vocab.txt").write_text(vocab)
  bert_cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64)
  bert = transformers.BertModel(bert_cfg, add_pooling_layer=False)
  save_file({k: v.contiguous() for k, v in bert.state_dict().items()}, str(tmp_path / "bert.safetensors"))
  return bert_cfg.to_dict()


@pytest.mark.slow  # ~2 min; `make test-slow` (CI runs it)
def test_pretrained_variant_three_tokenizers_through_export(tmp_path):
  """configs/coco.py:pretrained end to end on mock COCO: an open_clip dual teacher (CLIP BPE), a BLIP
  single-stream teacher (its own WordPiece vocab) and a BERT-initialized student (MiniLM's WordPiece),
  each from a checkpoint file written here, through distill and export. Sizes shrink by overrides;
  the config, the converters, the stages and the export are the real ones."""
  import json

  import tensorflow_datasets as tfds

  from mcad_jax import config_lib, convert, run, sharding, stages

  bert_cfg = _small_checkpoints(tmp_path)
  config = coco.get_config("pretrained")
  c = config
  c.data.update(dict(image_size=32, data_dir=str(tmp_path / "tfds"), eval_limit=0, num_threads=0))
  c.eval_batch_size, c.log_every, c.ckpt_every = 16, 1, 100
  clip_kw = convert.clip_model_kwargs(convert.read_state_dict(str(tmp_path / "clip.pt")))
  blip_kw = convert.blip_model_kwargs(convert.read_state_dict(str(tmp_path / "blip.safetensors")))
  c.teacher.model.image_kw.update(clip_kw["image_kw"])
  c.teacher.model.text_kw.update(clip_kw["text_kw"])
  c.teacher.pretrained = f"openclip:{tmp_path / 'clip.pt'}"
  c.fusion_teacher.model.image_kw.update(blip_kw["image_kw"])
  c.fusion_teacher.model.text_kw.update(blip_kw["text_kw"])
  c.fusion_teacher.model.tokenizer = f"wordpiece:{tmp_path / 'blip_vocab.txt'}"
  c.fusion_teacher.pretrained = f"blip:{tmp_path / 'blip.safetensors'}"
  c.distill.model.image_kw = dict(width=64, depth=1, heads=2, mlp_dim=128)
  c.distill.model.text_kw = convert.bert_text_kwargs(bert_cfg, gelu_exact=True)
  c.distill.pretrained = f"bert:{tmp_path / 'bert.safetensors'}"
  for name, emb in (("teacher", clip_kw["embed_dim"]), ("fusion_teacher", blip_kw["embed_dim"]),
                    ("distill", 32)):
    c[name].model.update(dict(embed_dim=emb, dtype="float32"))
    c[name].update(dict(steps=2, batch_size=8))
    c[name].optim.warmup_steps = 0
  c.export.update(dict(formats=("fp32",), onnx=False, reeval=("fp32",), index_formats=("fp16",),
                       index_encoder="fp32", representative_examples=8, parity_examples=8))
  config_lib.validate(config)
  w = tmp_path / "run"
  with tfds.testing.mock_data(num_examples=12):
    mesh = sharding.make_mesh(config.mesh)
    res = run.run_stages(config, str(w), mesh)
    distill = stages.build(config, "distill", str(w), mesh)
  names = {distill.tokenizer.name, *(t.name for t in distill.extra_tokenizers)}
  assert len(names) == 3 and "clip77" in names and "wordpiece32" in names, names
  assert {f"text@{n}" for n in names if n != "wordpiece32"} <= set(distill.batch_keys)
  assert {"teacher", "fusion_teacher", "student", "student_fp32"} <= set(res["retrieval"])
  meta = json.loads((w / "export" / "meta.json").read_text())
  assert meta["tokenizer"] == "wordpiece" and meta["text_len"] == 32
  assert res["export"]["student_text_fp32.tflite"]["cosine_min"] > 0.999
