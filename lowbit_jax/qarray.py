"""QArray: a quantized array as a JAX pytree (packed codes + scales [+ zero points] + its QuantSpec).

Invariant (every format, every granularity):

    q = quantize(x, spec)
    q.dequantize() ≈ x            within the bound documented in the format's module:
                                  INT: half a step (|scale| / 2; SIGNED_MAX: a step at the end opposite
                                  the signed max; plus the clipped amount under `ClipSearch`); ternary:
                                  scale / 2 below 1.5 * scale, clipping
                                  above; NF4: scale * MAX_GAP / 2 (+ clipping under double quantization);
                                  FP8: 2**-(mantissa_bits + 1) relative (normal range)
    q.shape == x.shape, q.dtype == x.dtype
    q.nbytes == the bytes actually stored (codes, padding included, + scales + zeros, recursively)

Storage, with `axis` the (negative) contraction axis, `K` its logical length, `K_pad` the padded one and `G` the
number of scale granules along it (1 for per-channel / per-tensor):

    codes : uint8, `axis` of length K_pad * bits / 8 (split-chunk bit packing, see formats/packing.py);
            FP8 codes are float8 with `axis` of length K_pad
    scale : spec.scale_dtype, `axis` of length G, every other axis full (per-tensor: length 1 from `axis` on);
            under double quantization, itself a QArray (8-bit, groups of dq_group_size along its last axis)
    zero  : like `scale`: the uint8 zero point of an asymmetric INT spec, or, under `ZeroPoint.FLOAT`, the float
            offset m in scale_dtype (``x ≈ code * scale + m``, llama.cpp Q4_1); None for symmetric formats
    in_scale : optional float32 per-input-channel factor s (AWQ, SmoothQuant), length K at `axis`, the
            stack axes before it full, 1 after it: the stored codes quantize s ⊙ W, and
            ``dequantize() = (code - zero) * scale / s``, so ``x @ W == (x / s) @ (s ⊙ W)`` runs the kernel on
            ``x / s``

The contraction block: a weight may be contracted over several consecutive axes (DenseGeneral's (H, Dh, D)
out-projection, a conv's (kh, kw, in)). The stored arrays hold them flattened into the one packed axis (K =
prod(k_shape), row-major), so groups, padding and every format work unchanged; `k_shape` unflattens them and
`shape` is the logical shape. When other axes sit between the contracted ones (maxtext's (heads, layers, head_dim,
embed)), the stored arrays keep those axes in front of the block and `perm` maps the stored-logical axes to the
logical ones (`shape[i] == stored_logical_shape[perm[i]]`); views (`lowbit_jax.qviews`) move data only when the
block is consecutive again. `k_axes` are the logical contracted axes.

`K_pad` rounds K up to whole groups and to the packing multiple; padded entries are zeros, masked out of every
statistic and sliced off by `dequantize`, so padding never changes a value. Because the spec's axis is stored
negative and the logical shape is derived from the leaves, a QArray stays valid under `vmap` / `pmap` / `scan`
slicing of leading axes.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec
from jax.tree_util import GetAttrKey, register_pytree_with_keys_class

from lowbit_jax import formats
from lowbit_jax.checks import check_array, check_finite_outputs
from lowbit_jax.formats import FORMATS, PACKED, packing
from lowbit_jax.spec import Format, PerGroup, PerTensor, QuantSpec


def _where(path: str | None) -> str:
  return f"{path}: " if path else ""


@register_pytree_with_keys_class
class QArray:
  """Packed low-bit codes with their scales; see the module docstring for the invariants."""

  def __init__(self, codes, scale, zero, *, spec: QuantSpec, k, dtype, in_scale=None, perm=None):
    self.codes = codes
    self.scale = scale
    self.zero = zero
    self.in_scale = in_scale
    self.spec = spec
    self.k_shape = (int(k),) if isinstance(k, (int, np.integer)) else tuple(int(n) for n in k)
    self.dtype = np.dtype(dtype)
    self.perm = None if perm is None else tuple(int(a) for a in perm)

  # --- pytree ---------------------------------------------------------------------------------------------
  def tree_flatten_with_keys(self):
    children = ((GetAttrKey("codes"), self.codes), (GetAttrKey("scale"), self.scale),
                (GetAttrKey("zero"), self.zero), (GetAttrKey("in_scale"), self.in_scale))
    return children, (self.spec, self.k_shape, self.dtype, self.perm)

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)   # no validation: leaves may be tracers, ShapeDtypeStructs or shardings
    obj.codes, obj.scale, obj.zero, obj.in_scale = children
    obj.spec, obj.k_shape, obj.dtype, obj.perm = aux
    return obj

  # --- logical view ---------------------------------------------------------------------------------------
  @property
  def axis(self) -> int:
    """The (negative) axis of the *stored* arrays that holds the flattened contraction block."""
    return self.spec.axis

  @property
  def k(self) -> int:
    """Logical length of the flattened contraction block (the product of `k_shape`)."""
    return math.prod(self.k_shape)

  @property
  def k_axes(self) -> tuple[int, ...]:
    """The logical axes (non-negative, ascending) that are contracted: `len(k_shape)` axes, consecutive unless
    `perm` interleaves others (maxtext's (heads, layers, head_dim, embed) out-projection)."""
    start = self.codes.ndim + self.axis
    block = range(start, start + len(self.k_shape))
    if self.perm is None:
      return tuple(block)
    return tuple(i for i, a in enumerate(self.perm) if a in block)

  @property
  def stored_logical_shape(self) -> tuple[int, ...]:
    """The shape `perm` maps to the logical one: the stored arrays' shape with the contraction block unflattened."""
    s = list(self.codes.shape)
    i = len(s) + self.axis
    return tuple(s[:i]) + self.k_shape + tuple(s[i + 1:])

  @property
  def stored_shape(self) -> tuple[int, ...]:
    """The logical shape with the contraction block flattened to one axis of length K (what codes encode)."""
    s = list(self.codes.shape)
    s[self.axis] = self.k
    return tuple(s)

  @property
  def k_pad(self) -> int:
    return self.codes.shape[self.axis] * 8 // self.spec.bits

  @property
  def n_groups(self) -> int:
    return self.scale.shape[self.axis]

  @property
  def group_len(self) -> int:
    """Entries of the padded contraction axis that share one scale."""
    return self.k_pad // self.n_groups

  @property
  def shape(self) -> tuple[int, ...]:
    """Logical shape: `stored_logical_shape` seen through `perm` (logical axis i is stored-logical axis
    perm[i]); `perm` None is the identity."""
    s = self.stored_logical_shape
    return s if self.perm is None else tuple(s[a] for a in self.perm)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes stored: codes (with padding) + scales + zeros, recursing into double-quantized scales."""
    return sum(math.prod(l.shape) * np.dtype(l.dtype).itemsize for l in jax.tree.leaves(self))

  @property
  def bits_per_weight(self) -> float:
    return 8.0 * self.nbytes / self.size

  def __repr__(self):
    return (f"QArray(shape={self.shape}, dtype={self.dtype.name}, format={self.spec.format.name}, "
            f"bits={self.spec.bits}, granularity={self.spec.granularity}, nbytes={self.nbytes})")

  # --- numerics -------------------------------------------------------------------------------------------
  def unpacked_codes(self):
    """The codes, one per entry (uint8, or float8 for FP8), padded axis of length K_pad."""
    if self.spec.format in PACKED and self.spec.bits < 8:
      return packing.unpack(self.codes, self.spec.bits, self.axis)
    return self.codes

  def scale_values(self):
    """The scales dequantization uses, float32, shape of `scale` (double quantization resolved)."""
    s = self.scale.dequantize() if isinstance(self.scale, QArray) else self.scale
    return s.astype(jnp.float32)

  def dequantize(self):
    """The float array this QArray stands for, in its original dtype and shape (padding removed).

    Example (a bfloat16 weight whose 100 inputs are padded to 4 groups of 32; the padding is dropped)::

      >>> import jax, jax.numpy as jnp
      >>> import lowbit_jax as lb
      >>> w = jax.random.normal(jax.random.PRNGKey(1), (100, 64)).astype(jnp.bfloat16)
      >>> q = lb.quantize(w, lb.int_spec(8, group_size=32))
      >>> q.unpacked_codes().shape
      (128, 64)
      >>> w_hat = q.dequantize()
      >>> w_hat.shape, w_hat.dtype
      ((100, 64), dtype(bfloat16))
      >>> bool(jnp.allclose(w_hat, w, atol=0.05))
      True
    """
    codes = self.unpacked_codes()                                              # (..., K_pad, ...)
    grouped = _split_axis(codes, self.axis, self.n_groups)                     # (..., G, g, ...)
    zero = None if self.zero is None else _expand(self.zero, self.axis)         # (..., G, 1, ...)
    out = formats.dequantize(grouped, _expand(self.scale_values(), self.axis), zero, self.spec)
    out = out.reshape(codes.shape)                                             # (..., K_pad, ...)
    out = lax.slice_in_dim(out, 0, self.k, axis=out.ndim + self.axis)
    if self.in_scale is not None:
      out = out / self.in_scale.astype(jnp.float32)
    out = out.reshape(self.stored_logical_shape)                               # K -> k_shape
    if self.perm is not None:
      out = jnp.transpose(out, self.perm)
    return out.astype(self.dtype)

  def without_in_scale(self) -> "QArray":
    """The stored codes as a QArray of s ⊙ W (what a kernel multiplies ``x / s`` with)."""
    return QArray(self.codes, self.scale, self.zero, spec=self.spec, k=self.k_shape, dtype=self.dtype,
                  perm=self.perm)


def dequantize(tree):
  """The float view of a parameter tree: every QArray leaf replaced by its `dequantize()` (a float array of its
  dtype and logical shape), every other leaf as it is. Each QArray is decoded by one compiled function per
  shape and spec rather than op by op (SmolLM2-135M's 211 QArrays: ~2 s instead of ~17 s); works inside `jax.jit`
  too."""
  from lowbit_jax.sparse import Sparse24   # its values may be QArrays: imported here, not at the top
  packed = lambda l: isinstance(l, (QArray, Sparse24))
  return jax.tree.map(lambda l: _dequantize_leaf(l) if packed(l) else l, tree, is_leaf=packed)


@jax.jit
def _dequantize_leaf(q):
  return q.dequantize()


def _expand(a, axis):
  """(..., G, ...) -> (..., G, 1, ...): a per-granule array broadcast against the grouped view."""
  return jnp.expand_dims(a, a.ndim + axis + 1)


def _split_axis(a, axis, n_groups):
  """(..., K_pad, ...) -> (..., G, K_pad / G, ...) at the negative `axis`."""
  i = a.ndim + axis
  return a.reshape(a.shape[:i] + (n_groups, a.shape[i] // n_groups) + a.shape[i + 1:])


# --- quantize ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Layout:
  axis: int      # negative
  k: int
  k_pad: int
  n_groups: int


def _layout(shape, spec: QuantSpec, path: str | None) -> _Layout:
  ndim = len(shape)
  axis = spec.axis
  if not -ndim <= axis < ndim:
    raise ValueError(f"{_where(path)}contraction axis {axis} of {spec.granularity} is missing from an array of "
                     f"shape {tuple(shape)}; expected an array with at least {max(axis + 1, -axis)} dims "
                     f"(choose the axis in the spec's granularity)")
  axis = axis - ndim if axis >= 0 else axis
  k = shape[axis]
  if k == 0:
    raise ValueError(f"{_where(path)}contraction axis {axis} has length 0; expected a non-empty axis")
  pm = packing.pack_multiple(spec.bits) if spec.format in PACKED else 1
  g = spec.group_size
  multiple = math.lcm(g, pm) if g else pm
  k_pad = -(-k // multiple) * multiple
  if spec.strict and k_pad != k:
    why = f"group size {g}" if g and k % g else f"the {spec.bits}-bit packing multiple {pm}"
    raise ValueError(f"{_where(path)}axis {axis} of length {k} is not a multiple of {why} and strict=True; "
                     f"expected a length divisible by {multiple} (or strict=False to pad)")
  n_groups = k_pad // g if g else 1
  return _Layout(axis=axis, k=k, k_pad=k_pad, n_groups=n_groups)


def check_quantizable(x, spec: QuantSpec, path: str | None = None) -> None:
  """Raise ValueError (naming `path`) unless `x` can be quantized with `spec`: a finite float array whose
  contraction axis exists (and, under `strict`, divides evenly). Works on abstract values (shape/dtype only)."""
  dtype = np.dtype(x.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{_where(path)}expected a floating-point array to quantize, got dtype {dtype} "
                     f"(integer, boolean and complex leaves cannot be quantized)")
  _layout(x.shape, spec, path)
  if not isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct)):
    host = np.asarray(x)
    if not np.all(np.isfinite(host)):
      bad = int(np.size(host) - np.count_nonzero(np.isfinite(host)))
      raise ValueError(f"{_where(path)}expected finite weights, found {bad} NaN/inf value(s) "
                       f"in an array of shape {host.shape}")


def quantize(x, spec: QuantSpec, *, path: str | None = None) -> QArray:
  """Quantize one float array. Jit-able with `spec` static. `path` only labels errors.

  Raises:
    ValueError: naming `path`, for an `x` that is not a float array, NaN/inf in `x`, a `spec` that is not a
      QuantSpec or does not fit `x`, and (outside `jit`) a result whose scales overflow to NaN/inf.

  Example (int4 in groups of 32 along the contraction axis -2: 4 bits of code + one float32 scale per 32)::

    >>> import jax, jax.numpy as jnp
    >>> import lowbit_jax as lb
    >>> w = jax.random.normal(jax.random.PRNGKey(0), (64, 64))
    >>> q = lb.quantize(w, lb.int_spec(4, group_size=32))
    >>> q
    QArray(shape=(64, 64), dtype=float32, format=INT, bits=4, granularity=PerGroup(size=32, axis=-2), nbytes=2560)
    >>> q.bits_per_weight
    5.0
    >>> bool(jnp.max(jnp.abs(q.dequantize() - w)) < 0.1 * jnp.max(jnp.abs(w)))
    True
  """
  if path is not None and not isinstance(path, str):
    raise ValueError(f"quantize: path must be None or a str (it labels errors), got {type(path).__name__}")
  check_array(x, f"quantize: {_where(path)}x")
  if not isinstance(spec, QuantSpec):
    raise ValueError(f"quantize: spec must be a lowbit_jax.QuantSpec (e.g. lowbit_jax.int_spec(4, "
                     f"group_size=128)), got {spec!r}")
  check_quantizable(x, spec, path)
  lay = _layout(x.shape, spec, path)
  if spec.axis != lay.axis:   # store the axis negative, so leading vmap/pmap/scan axes never shift it
    spec = dataclasses.replace(spec, granularity=dataclasses.replace(spec.granularity, axis=lay.axis))
  q = _quantize(jnp.asarray(x), spec, lay)
  if not isinstance(x, jax.core.Tracer):
    check_finite_outputs([(path or "quantize(x)", q)], "quantize")
  return q


def _quantize(x, spec: QuantSpec, lay: _Layout) -> QArray:
  fmt = FORMATS[spec.format]
  ndim, i = x.ndim, x.ndim + lay.axis
  pad = [(0, 0)] * ndim
  pad[i] = (0, lay.k_pad - lay.k)
  xf = jnp.pad(x.astype(jnp.float32), pad)                                       # (..., K_pad, ...)
  xg = _split_axis(xf, lay.axis, lay.n_groups)                                   # (..., G, g, ...)
  valid = (jnp.arange(lay.k_pad) < lay.k).reshape(lay.n_groups, -1)              # (G, g)
  valid = valid.reshape(valid.shape + (1,) * (ndim - i - 1))
  red_axes = tuple(range(i, ndim + 1)) if isinstance(spec.granularity, PerTensor) else (i + 1,)
  scale, zero = fmt.compute_params(xg, valid, red_axes, spec)                    # (..., G, 1, ...)
  if spec.float_offset:
    zero = zero.astype(spec.scale_dtype)                                         # the stored offset m
  stored = jnp.squeeze(scale, i + 1).astype(spec.scale_dtype)                    # (..., G, ...)
  if spec.double_quant:
    stored = quantize(stored, dq_spec(spec))
    used = stored.dequantize()
  else:
    used = stored
  codes = fmt.encode(xg, jnp.expand_dims(used.astype(jnp.float32), i + 1), zero, spec)
  zero = None if zero is None else jnp.squeeze(zero, i + 1)
  return from_codes(codes.reshape(xf.shape), stored, zero, spec=spec, k=lay.k, dtype=x.dtype)


def from_codes(codes, scale, zero, *, spec: QuantSpec, k: int, dtype, in_scale=None) -> QArray:
  """Assemble a QArray from *unpacked* codes (`uint8`, or float8 for FP8; padded axis of length K_pad at the
  spec's negative axis), stored scales (or a nested QArray) and zero points. Algorithms that choose codes
  themselves (GPTQ, AWQ) build their result with this; `dequantize` then gives ``(code - zero) * scale`` (or
  ``code * scale + zero`` for a float offset)."""
  if spec.format in PACKED and spec.bits < 8:
    codes = packing.pack(codes, spec.bits, spec.axis)
  return QArray(codes, scale, zero, spec=spec, k=k, dtype=dtype, in_scale=in_scale)


def with_in_scale(x, s, spec: QuantSpec, *, path: str | None = None) -> QArray:
  """Quantize ``s ⊙ x`` (s scales the contraction axis) and keep `s`, so that the QArray still stands for x:
  ``x @ W == (x / s) @ Q(s ⊙ W)`` (AWQ's and SmoothQuant's per-input-channel scaling, when it cannot be folded
  into the preceding operation). `s`: positive, shape (K,) or the stack axes then K."""
  x = jnp.asarray(x)
  i = x.ndim + (spec.axis if spec.axis < 0 else spec.axis - x.ndim)
  s = jnp.asarray(s, jnp.float32)
  s = s.reshape(s.shape + (1,) * (x.ndim - i - 1))                             # K at the axis, 1 after it
  if s.ndim != x.ndim or s.shape[i] != x.shape[i]:
    raise ValueError(f"{_where(path)}in_scale of shape {s.shape[:i + 1]} does not fit a weight of shape "
                     f"{x.shape} quantized along axis {spec.axis}; expected (..., {x.shape[i]})")
  q = quantize(x.astype(jnp.float32) * s, spec, path=path)
  return QArray(q.codes, q.scale, q.zero, spec=q.spec, k=q.k, dtype=x.dtype, in_scale=s)


def dq_spec(spec: QuantSpec) -> QuantSpec:
  """The second-level spec of double quantization: asymmetric 8-bit integers, groups along the scales' last
  axis (the output channels of a Flax kernel), float32 second-level scales."""
  return QuantSpec(format=Format.INT, bits=8, granularity=PerGroup(size=spec.dq_group_size, axis=-1),
                   symmetric=False, scale_dtype=jnp.float32)


# --- sharding ---------------------------------------------------------------------------------------------

def qarray_sharding(q: QArray, mesh: jax.sharding.Mesh, axis_name: str, *, out_axis: int = -1):
  """A QArray-shaped pytree of `NamedSharding`s that splits every leaf along its output axis `out_axis`
  (default -1, the output features of a Flax kernel) over mesh axis `axis_name`; leaves whose output axis does
  not divide evenly (e.g. a per-tensor scale) are replicated. Use with `jax.device_put(q, qarray_sharding(...))`.
  """
  if out_axis % q.ndim == q.axis % q.ndim:
    raise ValueError(f"qarray_sharding: out_axis {out_axis} is the contraction axis; expected another axis")
  n = mesh.shape[axis_name]

  def one(leaf):
    spec = [None] * leaf.ndim
    if leaf.shape[out_axis] % n == 0:
      spec[out_axis] = axis_name
    return NamedSharding(mesh, PartitionSpec(*spec))

  return jax.tree.map(one, q)
