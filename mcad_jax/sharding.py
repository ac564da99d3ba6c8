"""Device mesh, parameter sharding rules and batch sharding.

The mesh has two axes, `data` and `fsdp`. Batches are split over both; state
(params and optimizer moments) is sharded over `fsdp` by a regex -> tactic
table whose default tactic is FSDP: shard the largest evenly divisible dimension,
and replicate tensors too small to be worth it. Activations need no annotations:
with sharded inputs and params, XLA propagates shardings through the step.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
TACTICS = ("fsdp", "replicate")


def make_mesh(spec: Sequence[tuple[str, int]], devices: Sequence[Any] | None = None) -> Mesh:
  """Mesh from [(axis, size), ...]; one size may be -1 for 'all remaining devices'.

  Args:
    spec: sizes for the axes `data` and `fsdp`, in that order.
    devices: defaults to all devices (all processes).
  """
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(name for name, _ in spec)
  if names != AXES:
    raise ValueError(f"mesh axes must be {AXES} in that order, got {names}")
  sizes = [int(s) for _, s in spec]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {spec}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not split into mesh {spec}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(names, sizes, strict=True))} needs {int(np.prod(sizes))} devices, "
                     f"have {len(devices)}")
  dev = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(dev, names, axis_types=(AxisType.Auto,) * len(names))


def path_str(path) -> str:
  """'params/img/encoder/block0/attn/query/kernel' from a tree path."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def fsdp_spec(shape: Sequence[int], axis_size: int, min_size: int) -> P:
  """Shard the largest dimension divisible by `axis_size`; replicate small tensors."""
  if axis_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % axis_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(tree, mesh: Mesh, rules: Sequence[tuple[str, str]] = (),
                   min_size: int = 2**14):
  """NamedShardings for every leaf of `tree` (shapes or arrays).

  Args:
    tree: pytree whose leaves have `.shape`.
    mesh: the device mesh.
    rules: (regex, tactic) pairs, first `re.search` match on the leaf path wins;
      tactic is 'fsdp' or 'replicate'. Unmatched leaves use 'fsdp'.
    min_size: tensors with fewer elements are replicated.
  """
  compiled = [(re.compile(r), t) for r, t in rules]
  for _, t in compiled:
    if t not in TACTICS:
      raise ValueError(f"unknown sharding tactic {t!r}; known: {TACTICS}")
  fsdp = mesh.shape["fsdp"]

  def one(path, leaf):
    name = path_str(path)
    tactic = next((t for r, t in compiled if r.search(name)), "fsdp")
    if tactic == "replicate" or not getattr(leaf, "shape", ()):
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, fsdp_spec(leaf.shape, fsdp, min_size))

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
  """This process's share of a global batch; checks it splits evenly."""
  n_dev, n_proc = mesh.size, jax.process_count()
  if global_batch % n_dev:
    raise ValueError(f"batch size {global_batch} is not divisible by {n_dev} devices")
  return global_batch // n_proc


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles per-process numpy batches into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
