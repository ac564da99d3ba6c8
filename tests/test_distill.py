"""Distillation recipes: each term against its definition, cache vs online, frozen teachers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapes
from mcad_jax import checkpoint, recipes, sharding, stages, train
from mcad_jax.models.two_tower import l2_normalize
from mcad_jax.recipes import graph, hard_columns, mcad
from mcad_jax.recipes.heads import DistillHeads


def _unit(rng, n, d):
  return l2_normalize(jnp.asarray(rng.normal(size=(n, d)), jnp.float32))


def test_terms_vanish_when_student_equals_teacher():
  rng = np.random.default_rng(0)
  ti, tt = _unit(rng, 8, 16), _unit(rng, 8, 16)
  nodes = graph.Nodes({"ti": ti, "tt": tt, "si": ti, "st": tt}, {"si": ti, "st": tt})
  for edge in ("ti_si", "tt_st"):
    assert float(graph.edge_loss(nodes, edge, "fd", 10.0, 0.1)) == pytest.approx(0, abs=1e-6)
  for edge in graph.EDGES:
    for kind in ("kl", "sd"):
      assert float(graph.edge_loss(nodes, edge, kind, 10.0, 0.1)) == pytest.approx(0, abs=1e-5), (
          edge, kind)
  # A different student makes them positive.
  other = graph.Nodes({"ti": ti, "tt": tt, "si": tt, "st": ti}, {"si": tt, "st": ti})
  assert float(graph.edge_loss(other, "si_st", "kl", 10.0, 0.1)) > 1e-3
  assert float(graph.edge_loss(other, "ti_si", "fd", 10.0, 0.1)) > 1e-3


def test_teacher_sim_override_is_the_kl_target():
  rng = np.random.default_rng(1)
  ti, tt, si, st = (_unit(rng, 6, 8) for _ in range(4))
  target = jnp.asarray(rng.normal(size=(6, 6)), jnp.float32)
  nodes = graph.Nodes({"ti": ti, "tt": tt, "si": si, "st": st}, {}, teacher_sim=target)
  from mcad_jax import losses

  want = losses.kl_sim(si @ st.T, target, 0.2, tau_squared=False)
  np.testing.assert_allclose(graph.edge_loss(nodes, "si_st", "kl", 1.0, 0.2), want, rtol=1e-6)


def test_all_pairs_adds_itm_on_topk_only():
  rng = np.random.default_rng(2)
  v, t = _unit(rng, 5, 8), _unit(rng, 5, 8)
  sim = np.asarray(v @ t.T)
  out = np.asarray(mcad.all_pairs_sim(v, t, lambda r, c: jnp.ones(r.shape), 2.0, 2))
  changed = ~np.isclose(out, sim)
  assert (changed.sum(axis=1) == 2).all()
  top2 = np.argsort(-sim, axis=1)[:, :2]
  assert all(changed[i, top2[i]].all() for i in range(5))
  np.testing.assert_allclose(out[changed], sim[changed] + 2.0, rtol=1e-6)


def test_mcad_modify_with_zero_alpha_is_identity():
  rng = np.random.default_rng(3)
  v, t, f = _unit(rng, 4, 8), _unit(rng, 4, 8), jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  for combine in ("add", "gate"):
    heads = DistillHeads(8, 6, combine)
    p = heads.init(jax.random.key(0), v, t, v, t, f)["params"]
    v2, t2 = heads.apply({"params": p}, v, t, f, 0.0, method=heads.modify)
    np.testing.assert_allclose(v2, v, atol=1e-6)
    np.testing.assert_allclose(t2, t, atol=1e-6)
    v3, _ = heads.apply({"params": p}, v, t, f, 1.0, method=heads.modify)
    assert not np.allclose(v3, v)


def test_edge_table_validation():
  cfg = shapes.get_config("smoke").distill
  cfg.edges = (("si_si", "infonce", 1.0),)
  with pytest.raises(ValueError, match="joins a node to itself"):
    recipes.edge_table(cfg)
  cfg.edges = (("xx_st", "kl", 1.0),)
  with pytest.raises(ValueError, match="unknown edge"):
    recipes.edge_table(cfg)
  for recipe in recipes.RECIPES:
    cfg.edges, cfg.recipe = (), recipe
    assert recipes.edge_table(cfg)
  cfg.recipe = "student_only"
  assert not recipes.uses_teacher(cfg)


# ----------------------------------------------------------------------------- with teachers


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory, tiny_data):
  """Random-init teacher and fusion-teacher checkpoints, as if those stages had run."""
  del tiny_data
  w = tmp_path_factory.mktemp("teachers")
  config = shapes.get_config("smoke")
  mesh = sharding.make_mesh(config.mesh)
  for name in ("teacher", "fusion_teacher"):
    st = stages.build(config, name, str(w), mesh)
    params = jax.jit(st.init)(jax.random.key(len(name)))
    ck = checkpoint.Checkpointer(str(w / name / "checkpoints"), async_save=False)
    ck.save(1, {"params": params, "step": jnp.int32(1)}, {"iter": {}})
    ck.close()
  return w


def _steps(config, name, workdir, n=2):
  mesh = sharding.make_mesh(config.mesh)
  stage = stages.build(config, name, str(workdir), mesh)
  scfg = config[name]
  tx, sched = train.make_optimizer(scfg, stage.freeze)
  init, shard, _ = train.abstract_state(stage, scfg, config, mesh)
  state = jax.jit(init, out_shardings=shard)(jax.random.key(0))
  if stage.load_init is not None:
    state["params"] = stage.load_init(state["params"])
  start = jax.device_get(state["params"])
  from mcad_jax.data import pipeline

  it = pipeline.train_iterator(config.data, stage.tokenizer or stages.tokenizer(config), scfg.batch_size,
                               0, extra=stage.extra_tokenizers)
  fn = jax.jit(lambda s, b, f: train.train_step(
      s, b, f, loss_fn=stage.loss_fn, tx=tx, schedule=sched, accum=1, base_rng=jax.random.key(1),
      update_mask=stage.update_mask))
  losses = []
  for _ in range(n):
    b = next(it)
    if stage.host_fn:
      b = stage.host_fn(b)
    b = sharding.to_global({k: b[k] for k in stage.batch_keys}, mesh)
    state, m = fn(state, b, stage.frozen)
    losses.append(float(m["training_loss"]))
  return start, jax.device_get(state["params"]), losses, m, stage


slow = pytest.mark.slow
RECIPE_CASES = [
    # MCAD with the shapes config's ground truth over the hard columns on top of its KL.
    ("mcad", {}),
    # The other recipes and MCAD's other modes: slow (~45 s each); `make test-slow` runs them.
    pytest.param("clip_kd", {}, marks=slow), pytest.param("mcad", {"hard_label_weight": 0.0}, marks=slow),
    pytest.param("student_only", {}, marks=slow), pytest.param("tinyclip", {}, marks=slow),
    pytest.param("conaclip", {}, marks=slow),
    pytest.param("mcad", {"mcad.mode": "all_pairs"}, marks=slow),
    pytest.param("mcad", {"mcad.combine": "concat"}, marks=slow),
    pytest.param("mcad", {"mcad.combine": "gate", "mcad.proj": "fixed"}, marks=slow),
]


def _case_id(case):
  r, o = case.values if hasattr(case, "values") else case
  return "-".join([r, *(f"{k}={v}" for k, v in o.items())])


@pytest.mark.parametrize("recipe,over", RECIPE_CASES, ids=[_case_id(c) for c in RECIPE_CASES])
def test_every_recipe_trains_on_8_devices(teacher_workdir, recipe, over):
  assert jax.device_count() == 8
  config = shapes.get_config("smoke")
  config.distill.recipe = recipe
  for k, v in over.items():
    *sec, key = k.split(".")
    (config.distill[sec[0]] if sec else config.distill)[key] = v
  start, end, losses, m, stage = _steps(config, "distill", teacher_workdir)
  assert all(np.isfinite(losses))
  assert set(end) == {"student", "heads"}  # No teacher params in the trained state.
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(start["student"]),
                                                  jax.tree.leaves(end["student"]), strict=True)]
  assert any(moved)
  if recipe == "student_only":
    # InfoNCE (weight 1) plus the twins' softmax, at the ground truth's weight when one is set.
    w = config.distill.hard_label_weight or config.distill.hard_weight
    np.testing.assert_allclose(m["training_loss"],
                               m["loss/si_st_infonce"] + w * m["loss/hard_softmax"], rtol=1e-5)
  if recipe != "student_only":
    assert any(k.startswith("loss/") and k != "loss/si_st_infonce" for k in m)
    assert "loss/hard_kl" in m  # The smoke student has hard columns.
    assert ("loss/hard_softmax" in m) == bool(config.distill.hard_label_weight)


@pytest.mark.slow  # ~45 s; `make test-slow` (CI runs it)
def test_two_stage_conaclip_freezes_text_tower_first(teacher_workdir):
  config = shapes.get_config("smoke")
  config.distill.recipe = "conaclip"
  config.distill.conaclip.schedule = "two_stage"
  start, end, _, _, _ = _steps(config, "distill", teacher_workdir)
  s0, s1 = start["student"], end["student"]
  np.testing.assert_array_equal(s0["txt"]["token_embedding"], s1["txt"]["token_embedding"])
  assert not np.allclose(s0["img"]["embedding"]["kernel"], s1["img"]["embedding"]["kernel"])


@pytest.mark.parametrize("fusion,terms", [
    ({}, ("loss/twin_softmax", "twin_acc/relation")),
    ({"loss": "itm"}, ("loss/itm", "twin_acc/relation")),
    ({"grounding_weight": 1.0}, ("loss/twin_softmax", "loss/grounding", "ground_acc")),
])
def test_fusion_stage_keeps_frozen_towers(teacher_workdir, fusion, terms):
  config = shapes.get_config("smoke")
  config.fusion_teacher.fusion.update(fusion)
  start, end, losses, m, _ = _steps(config, "fusion_teacher", teacher_workdir, n=3)
  teacher = checkpoint.load_params(str(teacher_workdir / "teacher" / "checkpoints"),
                                   jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                start["dual"]))
  for a, b, c in zip(jax.tree.leaves(start["dual"]), jax.tree.leaves(end["dual"]),
                     jax.tree.leaves(teacher), strict=True):
    np.testing.assert_array_equal(a, b)   # Zero updates...
    np.testing.assert_array_equal(a, c)   # ...to the dual teacher's own towers.
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(start["fusion"]),
                                                   jax.tree.leaves(end["fusion"]), strict=True))
  assert set(terms) <= set(m) and all(np.isfinite(losses))
  if "grounding_weight" in fusion:  # The grounding head trains with the fusion layers.
    assert not np.allclose(start["ground_head"]["kernel"], end["ground_head"]["kernel"])


@pytest.mark.slow  # ~2 min; `make test-slow` (CI runs it)
def test_cached_and_online_teachers_give_the_same_losses(teacher_workdir, tmp_path):
  config = shapes.get_config("smoke")
  config.data.data_dir = ""
  _, _, online, _, _ = _steps(config, "distill", teacher_workdir, n=3)
  # In the stage's own cache_dir; test_faults covers the default one, beside the dataset.
  config.distill.cache, config.distill.cache_dir = True, str(tmp_path / "cache")
  _, end, cached, _, stage = _steps(config, "distill", teacher_workdir, n=3)
  assert list((tmp_path / "cache").glob("*/*/meta.json"))
  # The hard columns' teacher outputs (twins' embeddings and ITM logits) come from the cache too.
  assert stage.host_fn is not None
  assert {"teacher_f", "teacher_hard_t", "teacher_hard_itm"} <= set(stage.batch_keys)
  np.testing.assert_allclose(cached, online, rtol=2e-5)


@pytest.mark.slow  # ~60 s; the mixed-tokenizer path end to end is test_coco.py, in the default suite
def test_each_teacher_reads_its_own_tokenizer(tiny_data, tmp_path):
  """A CLIP-BPE dual teacher, a WordPiece fusion teacher with its own towers and length, and a
  WordPiece student in one run: batches carry each tokenizer's ids, and online teachers and the
  teacher cache (which tokenizes the training split itself) give the same losses."""
  del tiny_data
  config = shapes.get_config("smoke")
  config.data.data_dir = ""
  config.teacher.model.update(dict(tokenizer="clip", text_len=12))
  config.fusion_teacher.model.text_len = 20
  config.fusion_teacher.fusion.update(dict(towers_from="", freeze_towers=False))
  mesh = sharding.make_mesh(config.mesh)
  for name in ("teacher", "fusion_teacher"):
    st = stages.build(config, name, str(tmp_path), mesh)
    params = jax.jit(st.init)(jax.random.key(len(name)))
    assert st.tokenizer.name == {"teacher": "clip12", "fusion_teacher": "wordpiece20"}[name]
    ck = checkpoint.Checkpointer(str(tmp_path / name / "checkpoints"), async_save=False)
    ck.save(1, {"params": params, "step": jnp.int32(1)}, {"iter": {}})
    ck.close()
  assert params["dual"]["txt"]["pos_embedding"].shape[1] == 20
  _, _, online, _, stage = _steps(config, "distill", tmp_path, n=1)
  assert {"text", "text@clip12", "text@wordpiece20"} <= set(stage.batch_keys)
  from mcad_jax.data import pipeline

  b = next(pipeline.train_iterator(config.data, stage.tokenizer, 8, 0, extra=stage.extra_tokenizers))
  assert b["text"].shape == (8, config.data.text_len) and b["text@wordpiece20"].shape == (8, 20)
  assert (b["text@clip12"][:, 0] == 49406).all() and (b["text"][:, 0] == 101).all()
  assert (b["hn_true@clip12"][:, 0] == 49406).all() if "hn_true@clip12" in b else True
  config.distill.cache = True
  _, _, cached, _, stage = _steps(config, "distill", tmp_path, n=1)
  assert "text@clip12" not in stage.batch_keys
  np.testing.assert_allclose(cached, online, rtol=2e-5)


def test_teacher_cache_lives_beside_the_dataset_unless_the_stage_names_a_dir(tmp_path):
  from mcad_jax import teacher_cache

  config = shapes.get_config("smoke")
  config.data.data_dir = str(tmp_path / "tfds")
  name = config.data.tfds_name.replace("/", "_")
  assert teacher_cache.cache_root(config) == str(tmp_path / "tfds" / "mcad_teacher_cache" / name)
  assert teacher_cache.cache_root(config, str(tmp_path / "c")) == str(tmp_path / "c" / name)


# ----------------------------------------------------------------------------- the protocol's switches


def test_hard_column_teacher_scores_add_the_itm_logit_at_its_weight():
  """teacher_hard_logits = scale * v.t_hard + hard_itm_weight * ITM (NumPy reference)."""
  rng = np.random.default_rng(4)
  v = np.asarray(_unit(rng, 6, 8))
  hard_t = np.asarray(_unit(rng, 18, 8)).reshape(6, 3, 8)
  itm = rng.normal(size=(6, 3)).astype(np.float32)
  tout = {"v": jnp.asarray(v), "hard_t": jnp.asarray(hard_t), "hard_itm": jnp.asarray(itm),
          "scale": 7.0}
  for w in (0.0, 1.0, 2.5):
    got = hard_columns.teacher_hard_logits(tout, {}, None, None, True, w)
    want = 7.0 * np.einsum("be,bce->bc", v, hard_t) + w * itm
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _grads(config, workdir):
  """The distill stage's gradients on one training batch, at init."""
  mesh = sharding.make_mesh(config.mesh)
  stage = stages.build(config, "distill", str(workdir), mesh)
  params = jax.jit(stage.init)(jax.random.key(0))
  from mcad_jax.data import pipeline

  it = pipeline.train_iterator(config.data, stage.tokenizer or stages.tokenizer(config),
                               config.distill.batch_size, 0, extra=stage.extra_tokenizers)
  b = next(it)
  b = stage.host_fn(b) if stage.host_fn else b
  b = {k: jnp.asarray(b[k]) for k in stage.batch_keys}
  return jax.grad(lambda p: stage.loss_fn(p, b, jax.random.key(1), stage.frozen)[0])(params)


@pytest.mark.parametrize("proj", ["fixed", "learned"])
def test_teacher_side_frozen_switch(teacher_workdir, proj):
  """mcad.proj='fixed': the projections that build the modified teacher features get zero
  gradient and stay at their init through training (no weight decay either); 'learned' moves
  them. The student-to-teacher heads learn in both."""
  config = shapes.get_config("smoke")
  config.distill.mcad.proj = proj
  g = _grads(config, teacher_workdir)
  start, end, _, _, _ = _steps(config, "distill", teacher_workdir)
  for k in ("p_v", "p_t"):
    zero = not np.any(np.asarray(g["heads"][k]["kernel"]))
    same = np.array_equal(start["heads"][k]["kernel"], end["heads"][k]["kernel"])
    assert zero == same == (proj == "fixed"), (k, zero, same)
  assert np.any(np.asarray(g["heads"]["proj_img"]["kernel"]))
  assert not np.array_equal(start["heads"]["proj_img"]["kernel"], end["heads"]["proj_img"]["kernel"])


def test_dual_teacher_with_twins_adds_their_softmax(teacher_workdir):
  """teacher.hard_columns: the contrastive loss + hard_label_weight * the twins' softmax."""
  config = shapes.get_config("smoke")
  config.teacher.hard_columns, config.teacher.hard_label_weight = True, 2.0
  _, _, losses_, m, stage = _steps(config, "teacher", teacher_workdir)
  assert "hn_relation" in stage.batch_keys
  assert float(m["loss/hard_softmax"]) > 0
  np.testing.assert_allclose(m["training_loss"], m["loss/infonce"] + 2.0 * m["loss/hard_softmax"],
                             rtol=1e-5)
  config.teacher.hard_columns = False
  _, _, _, m, stage = _steps(config, "teacher", teacher_workdir, n=1)
  assert "loss/hard_softmax" not in m and "hn_relation" not in stage.batch_keys
