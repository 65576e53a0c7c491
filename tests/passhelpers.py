"""Small models and helpers shared by the tests of `lowbit_jax.passes`."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lowbit_jax as lb


def is_q(x) -> bool:
  return isinstance(x, lb.QArray)


@jax.jit
def dequantized(tree):
  """The float tree a quantized tree stands for (jitted: one compile instead of many eager unpack ops)."""
  return jax.tree.map(lambda l: l.dequantize() if is_q(l) else l, tree, is_leaf=is_q)


@functools.lru_cache(maxsize=None)
def quantized_jit(apply):
  """`jax.jit(lb.quantized(apply))`, one per apply function, so that quantized trees of one structure trace and
  compile once (jax shares `jax.jit(apply)` of one function the same way)."""
  return jax.jit(lb.quantized(apply))


def quantized_kl(apply, params, qparams, tokens) -> float:
  """Mean KL(float run || packed run of the quantized tree) of `apply` on `tokens`, both jitted."""
  from lowbit_jax.eval import kl_divergence
  return float(kl_divergence(jax.jit(apply)(params, tokens), quantized_jit(apply)(qparams, tokens)))


def random_like(shapes, seed: int = 0, scale: float = 0.1):
  """Random float params with the structure of a `jax.eval_shape` tree (avoids compiling a model's init)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape).astype(s.dtype)), shapes)


def assert_close(a, b, tol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(1.0, float(np.max(np.abs(b))))
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale)


class Block(nn.Module):
  """relu MLP block with a residual; (carry, x) signature for nn.scan."""
  hidden: int = 24

  @nn.compact
  def __call__(self, x, _):
    h = nn.Dense(self.hidden, name="up")(x)
    return x + nn.Dense(x.shape[-1], name="down")(jax.nn.relu(h)), None


class ScanModel(nn.Module):
  """Dense -> nn.scan(nn.remat(Block)) over `n_layers` -> Dense."""
  n_layers: int = 3

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(16, name="inp")(x)
    stack = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True},
                    length=self.n_layers)
    x, _ = stack(name="layers")(x, None)
    return nn.Dense(8, name="head")(x)


def scan_model_layer_inputs(params, x):
  """By hand: the inputs of every Dense of ScanModel, {name: list of (rows, K) arrays per layer}."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  out = {"inp": [x], "up": [], "down": [], "head": []}
  x = x @ p["inp"]["kernel"] + p["inp"]["bias"]
  for i in range(p["layers"]["up"]["kernel"].shape[0]):
    lp = jax.tree.map(lambda a, i=i: a[i], p["layers"])
    out["up"].append(x)
    h = np.maximum(x @ lp["up"]["kernel"] + lp["up"]["bias"], 0.0)
    out["down"].append(h)
    x = x + h @ lp["down"]["kernel"] + lp["down"]["bias"]
  out["head"].append(x)
  return {k: [v.reshape(-1, v.shape[-1]) for v in vs] for k, vs in out.items()}


def float_shapes(jaxpr) -> list[tuple[int, ...]]:
  """Shapes of every float-typed value a jaxpr (or ClosedJaxpr) computes, recursing into the sub-jaxprs of its
  equations (scan, while, cond branches, pjit, custom_jvp/vjp, remat, ...)."""
  from jax.extend import core as jex

  def subs(v):
    if isinstance(v, jex.ClosedJaxpr):
      yield v.jaxpr
    elif isinstance(v, jex.Jaxpr):
      yield v
    elif isinstance(v, (tuple, list)):
      for e in v:
        yield from subs(e)

  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  shapes = []
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      aval = getattr(v, "aval", None)
      if aval is not None and hasattr(aval, "dtype") and jnp.issubdtype(aval.dtype, jnp.floating):
        shapes.append(tuple(aval.shape))
    for p in eqn.params.values():
      for sub in subs(p):
        shapes.extend(float_shapes(sub))
  return shapes


def float_buffers(jaxpr) -> list[int]:
  """Element counts of every float-typed value a jaxpr computes (`float_shapes`)."""
  return [int(np.prod(s, dtype=np.int64)) for s in float_shapes(jaxpr)]


def max_float_buffer(closed_jaxpr) -> int:
  """The largest float value (element count) anywhere in a jaxpr, sub-jaxprs included; 0 if none."""
  return max(float_buffers(closed_jaxpr), default=0)


def data_parallel(fn, n_replicated: int, n_sharded: int, n_devices: int = 8):
  """`jit(shard_map(fn))` over the mesh ("data",) of the first `n_devices` devices: the first `n_replicated`
  arguments replicated (params, optimizer and FP8 state), the next `n_sharded` split along their leading (batch)
  axis; every output replicated. The arguments are placed on the mesh first, so that feeding outputs back in (a
  second step) reuses the compiled step."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS
  assert jax.device_count() >= n_devices
  mesh = Mesh(np.array(jax.devices()[:n_devices]), ("data",))
  specs = (PS(),) * n_replicated + (PS("data"),) * n_sharded
  step = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=PS()))
  placements = tuple(NamedSharding(mesh, s) for s in specs)
  return lambda *args: step(*(jax.device_put(a, p) for a, p in zip(args, placements, strict=True)))


def optax_step(opt, grads, opt_state, params):
  """(params, opt_state) after one `opt` update, under the standard promotion optax's own code relies on."""
  import optax
  with jax.numpy_dtype_promotion("standard"):
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def assert_trees_close(a, b, tol=1e-5):
  """Same tree structure, every pair of leaves `assert_close`."""
  assert jax.tree.structure(a) == jax.tree.structure(b), (jax.tree.structure(a), jax.tree.structure(b))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert_close(x, y, tol)


def assert_mse_step_is_data_parallel(model, params, x, y):
  """One SGD-with-momentum step on the mean squared error of `model(params, x)` against `y`, with the batch split
  over 8 devices (shard_map; each replica differentiates the pmean of its shard losses, i.e. the global loss),
  equals the one-device step on the whole batch (params and optimizer state, 1e-5), and moved the params."""
  import optax
  loss = lambda p, x, y: jnp.mean((model(p, x) - y) ** 2)
  opt = optax.sgd(0.5, momentum=0.9)
  with jax.numpy_dtype_promotion("standard"):
    s0 = opt.init(params)
  one = jax.jit(lambda p, s, x, y: optax_step(opt, jax.grad(loss)(p, x, y), s, p))(params, s0, x, y)
  dp = data_parallel(lambda p, s, x, y: optax_step(
      opt, jax.grad(lambda p: jax.lax.pmean(loss(p, x, y), "data"))(p), s, p), 2, 2)(params, s0, x, y)
  assert_trees_close(dp, one, 1e-5)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(one[0]), jax.tree.leaves(params)))
  assert moved > 1e-2
