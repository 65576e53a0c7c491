"""QuantSpec: one description of every low-bit format, validated on construction.

A spec says *what* is stored; `lowbit_jax.quantize` / `QArray` say *how*. Every spec describes a tensor whose
values are recovered as

    x ≈ decode(code) * scale                (symmetric formats)
    x ≈ (code - zero) * scale               (asymmetric integer formats, `ZeroPoint.INTEGER`)
    x ≈ code * scale + offset               (asymmetric integer formats, `ZeroPoint.FLOAT`: llama.cpp Q4_1/Q4_K)

with one `scale` (and `zero` or `offset`) per *granule*. How a granule's scale is chosen: symmetric integer formats
follow `SymGrid` (the full code range, Q4_0's signed-max rule, by default); any INT or NF4 spec may add
`ClipSearch`, which shrinks the range per granule to the clipping ratio with the least reconstruction error.
Granularity is always expressed through the **contraction axis** (the input axis of a matmul weight; `-2` for Flax's
`(in, out)` kernels and for stacked `(layers, in, out)` ones):

* `PerTensor(axis)`: one scale for the whole tensor (`axis` is only where codes are packed). Axes *before*
  the contraction axis index a stack of tensors (scanned layers, experts), and each gets its own scale, so a
  stacked QArray can be sliced by `vmap`/`scan` like its float original.
* `PerChannel(axis)`: scales are shared along `axis`; every other index (output channel, layer, head) has its own.
* `PerGroup(size, axis)`: like per-channel, but `axis` is cut into groups of `size` consecutive entries, each with
  its own scale (GPTQ/AWQ "group size"). An axis that is not a multiple of `size` is padded to whole groups; the
  padding is stored, counted in `QArray.nbytes`, masked out of every statistic and sliced off on dequantization,
  so it never changes a result. With `strict=True` a non-dividing group size raises instead.

Weights-and-activations formats add `activations=ActQuant(...)`: the weight is stored as above, and every matmul
with it (`lowbit_jax.kernels.qmatmul`, hence `lowbit_jax.quantized(apply_fn)`) quantizes its activations
dynamically to 8 bits (W8A8: SmoothQuant's per-token int8, FP8 x FP8 for FP8 weights), or runs LLM.int8()'s
mixed-precision decomposition when `ActQuant.outlier_threshold` is set. `dequantize()` is unaffected.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Union

import jax.numpy as jnp
import numpy as np

from lowbit_jax.checks import as_bool, as_float, as_int, check_enum


class Format(enum.Enum):
  """The value sets a code can stand for."""
  INT = "int"            # uniform integers, 2/3/4/8 bits, symmetric or with a zero point
  TERNARY = "ternary"    # {-1, 0, +1} with BitNet b1.58's absmean scale, stored in 2 bits
  NF4 = "nf4"            # QLoRA's 16 NormalFloat levels, absmax scale per block
  FP8_E4M3 = "fp8_e4m3"  # jnp.float8_e4m3fn codes, max 448, saturating
  FP8_E5M2 = "fp8_e5m2"  # jnp.float8_e5m2 codes, max 57344, saturating


class SymGrid(enum.Enum):
  """How a symmetric integer format maps a granule's range onto its 2**b codes (implicit zero 2**(b-1)).

  Measured on stories260K and SmolLM2-135M (experiments/results/grids_stories260k.md, grids_smollm2.md): SIGNED_MAX
  gives the least output error of the three at 4, 3 and 2 bits on both models, and is the default
  (`DEFAULT_SYM_GRID`); it is also llama.cpp Q4_0's grid, so int4 g32 float16 QArrays are Q4_0 blocks as they are.
  """
  FULL = "full"              # scale = absmax / (2**(b-1) - 1/2): all 2**b levels, +absmax clipped by half a step
                             # (IST-DASLab GPTQ's `2*absmax / (2**b - 1)` with zero 2**(b-1); qwix's qmax + 0.5)
  SIGNED_MAX = "signed_max"  # scale = m / -2**(b-1), m the signed value of largest magnitude: it lands exactly on the
                             # extra level (llama.cpp Q4_0); the scale may be negative
  RESTRICTED = "restricted"  # scale = absmax / (2**(b-1) - 1): 2**b - 1 levels, no clipping (llama.cpp Q8_0,
                             # SmoothQuant's and bitsandbytes' int8)


class ZeroPoint(enum.Enum):
  """How an asymmetric integer format stores its offset."""
  INTEGER = "integer"   # uint8 zero point z: x ≈ (code - z) * scale, range [min(x, 0), max(x, 0)] (GPTQ, AWQ)
  FLOAT = "float"       # offset m in scale_dtype: x ≈ code * scale + m, range [min(x), max(x)] (llama.cpp Q4_1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipSearch:
  """Per-granule search of the clipping ratio that minimises the reconstruction error (IST-DASLab GPTQ's
  `quant.py` `mse=True` grid; the idea of llama.cpp's `make_qx_quants`): ratios 1, 1 - 1/steps, ... above
  1 - max_shrink, each shrinking the granule's range; the ratio with the least ``sum |x - deq(x)|**norm`` wins.

  Attributes:
    steps: ratio resolution (the reference's `grid`, 100).
    max_shrink: the largest fraction the range may shrink by (the reference's `maxshrink`, 0.8).
    norm: the error exponent (the reference's 2.4: between MSE and max-error).
  """
  steps: int = 100
  max_shrink: float = 0.8
  norm: float = 2.4

  def __post_init__(self):
    object.__setattr__(self, "steps", as_int(self.steps, "ClipSearch.steps", low=1))
    object.__setattr__(self, "max_shrink", as_float(self.max_shrink, "ClipSearch.max_shrink", low=0.0, high=1.0,
                                                    high_open=True))
    object.__setattr__(self, "norm", as_float(self.norm, "ClipSearch.norm", low=0.0, low_open=True))

  @property
  def ratios(self) -> np.ndarray:
    """The candidate clipping ratios, float32, starting at 1 (no clipping)."""
    n = max(int(self.max_shrink * self.steps), 1)     # quant.py: range(int(maxshrink * grid))
    return (1.0 - np.arange(n, dtype=np.float64) / self.steps).astype(np.float32)


DEFAULT_SYM_GRID = SymGrid.SIGNED_MAX   # chosen by measurement, see SymGrid


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerTensor:
  """One scale per tensor (per entry of the axes before `axis`, the stack axes); codes are packed along `axis`."""
  axis: int = -2

  def __post_init__(self):
    object.__setattr__(self, "axis", as_int(self.axis, f"{type(self).__name__}.axis"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerChannel:
  """Scales shared along the contraction `axis`; one per index of every other axis."""
  axis: int = -2

  def __post_init__(self):
    object.__setattr__(self, "axis", as_int(self.axis, f"{type(self).__name__}.axis"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerGroup:
  """Groups of `size` consecutive entries along the contraction `axis`, one scale each."""
  size: int
  axis: int = -2

  def __post_init__(self):
    object.__setattr__(self, "size", as_int(self.size, "PerGroup.size (group_size)", low=1))
    object.__setattr__(self, "axis", as_int(self.axis, "PerGroup.axis"))


Granularity = Union[PerTensor, PerChannel, PerGroup]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActQuant:
  """Dynamic activation quantization of every matmul with the weight (W8A8).

  Attributes:
    bits: activation code width; 8 only (int8 for INT weights, FP8 E4M3 for FP8 weights).
    per_token: one scale per token (row of x), else one per tensor (SmoothQuant's per-token dynamic default).
    outlier_threshold: LLM.int8() (Dettmers et al. 2022): the input columns of x with any |x| above it run in
      float with the dequantized weight rows, the rest in int8 (6.0 in the paper); None: plain W8A8.
  """
  bits: int = 8
  per_token: bool = True
  outlier_threshold: float | None = None

  def __post_init__(self):
    as_int(self.bits, "ActQuant.bits (only 8-bit activations are supported)", choices=(8,))
    object.__setattr__(self, "per_token", as_bool(self.per_token, "ActQuant.per_token"))
    if self.outlier_threshold is not None:
      object.__setattr__(self, "outlier_threshold",
                         as_float(self.outlier_threshold, "ActQuant.outlier_threshold (or None)", low=0.0))

# Storage width in bits of one code, per format (INT takes it from `bits`).
_FIXED_BITS = {Format.TERNARY: 2, Format.NF4: 4, Format.FP8_E4M3: 8, Format.FP8_E5M2: 8}
_INT_BITS = (2, 3, 4, 8)
_SCALE_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
  """A low-bit format and how its scales are laid out.

  Attributes:
    format: the code value set (`Format`).
    bits: bits per stored code. Required for `Format.INT` (2, 3, 4 or 8); fixed by the format otherwise
      (ternary 2, NF4 4, FP8 8) and may be left as None.
    granularity: `PerTensor`, `PerChannel` or `PerGroup`, all keyed by the contraction axis.
    symmetric: False stores a zero point per granule (integer formats only).
    scale_dtype: dtype scales are stored in (float32, bfloat16 or float16).
    strict: raise when a group size does not divide the contraction axis instead of padding.
    double_quant: QLoRA's double quantization: the scales themselves are quantized to 8-bit integers in groups
      of `dq_group_size` (needs `PerGroup`).
    dq_group_size: block size of the second-level quantization (QLoRA: 256).
    activations: `ActQuant` to quantize the activations of every matmul with this weight too (W8A8,
      LLM.int8()); needs 8-bit INT weights, ternary weights (BitNet b1.58: int8 activations), or FP8 weights (FP8
      activations); ternary and FP8 take no outlier threshold. None:
      weight-only.
    grid: `SymGrid` of a symmetric INT spec (None: `DEFAULT_SYM_GRID`); must stay None otherwise.
    zero_point: `ZeroPoint` of an asymmetric INT spec (None: `ZeroPoint.INTEGER`); must stay None otherwise.
    clip: `ClipSearch` to pick each granule's range by reconstruction error (INT and NF4); None: the full range.
  """
  format: Format
  bits: int | None = None
  granularity: Granularity = PerChannel()
  symmetric: bool = True
  scale_dtype: object = jnp.float32
  strict: bool = False
  double_quant: bool = False
  dq_group_size: int = 256
  activations: ActQuant | None = None
  grid: SymGrid | None = None
  zero_point: ZeroPoint | None = None
  clip: ClipSearch | None = None

  def __post_init__(self):
    check_enum(self.format, Format, "QuantSpec.format")
    for name in ("symmetric", "strict", "double_quant"):
      object.__setattr__(self, name, as_bool(getattr(self, name), f"QuantSpec.{name}"))
    if self.format is Format.INT:
      if self.bits is None or as_int(self.bits, "QuantSpec.bits") not in _INT_BITS:
        raise ValueError(f"QuantSpec: Format.INT supports bits in {_INT_BITS}, got bits={self.bits!r}")
    else:
      fixed = _FIXED_BITS[self.format]
      if self.bits is None:
        object.__setattr__(self, "bits", fixed)
      elif as_int(self.bits, "QuantSpec.bits") != fixed:
        raise ValueError(f"QuantSpec: {self.format} stores {fixed}-bit codes, got bits={self.bits!r}")
    object.__setattr__(self, "bits", int(self.bits))
    if not isinstance(self.granularity, (PerTensor, PerChannel, PerGroup)):
      raise ValueError(
          f"QuantSpec.granularity must be PerTensor, PerChannel or PerGroup, got {self.granularity!r}")
    if not self.symmetric and self.format is not Format.INT:
      raise ValueError(f"QuantSpec: only Format.INT has a zero point; {self.format} must be symmetric")
    try:
      scale_dtype = np.dtype(self.scale_dtype)
    except TypeError as e:
      raise ValueError(f"QuantSpec.scale_dtype: expected one of {_SCALE_DTYPES}, got {self.scale_dtype!r}") from e
    if scale_dtype not in _SCALE_DTYPES:
      raise ValueError(f"QuantSpec.scale_dtype: expected one of {[str(d) for d in _SCALE_DTYPES]}, "
                       f"got {scale_dtype}")
    object.__setattr__(self, "scale_dtype", scale_dtype)
    if self.double_quant and not isinstance(self.granularity, PerGroup):
      raise ValueError("QuantSpec.double_quant needs PerGroup granularity (it quantizes the per-group scales)")
    object.__setattr__(self, "dq_group_size", as_int(self.dq_group_size, "QuantSpec.dq_group_size", low=1))
    self._check_activations()
    self._check_grid()

  def _check_grid(self) -> None:
    sym_int = self.format is Format.INT and self.symmetric
    if self.grid is not None and (not isinstance(self.grid, SymGrid) or not sym_int):
      raise ValueError(f"QuantSpec.grid: expected None or a lowbit_jax.SymGrid on a symmetric Format.INT spec, got "
                       f"grid={self.grid!r} with format={self.format}, symmetric={self.symmetric}")
    if sym_int and self.grid is None:
      object.__setattr__(self, "grid", DEFAULT_SYM_GRID)
    asym_int = self.format is Format.INT and not self.symmetric
    if self.zero_point is not None and (not isinstance(self.zero_point, ZeroPoint) or not asym_int):
      raise ValueError(f"QuantSpec.zero_point: expected None or a lowbit_jax.ZeroPoint on an asymmetric Format.INT "
                       f"spec, got zero_point={self.zero_point!r} with format={self.format}, "
                       f"symmetric={self.symmetric}")
    if asym_int and self.zero_point is None:
      object.__setattr__(self, "zero_point", ZeroPoint.INTEGER)
    if self.clip is not None and (not isinstance(self.clip, ClipSearch)
                                  or self.format not in (Format.INT, Format.NF4)):
      raise ValueError(f"QuantSpec.clip: expected None or a lowbit_jax.ClipSearch on a Format.INT or Format.NF4 "
                       f"spec, got clip={self.clip!r} with format={self.format}")

  @property
  def float_offset(self) -> bool:
    """True when the stored `zero` is a float offset m (``x ≈ code * scale + m``), not an integer zero point."""
    return self.zero_point is ZeroPoint.FLOAT

  def _check_activations(self) -> None:
    act = self.activations
    if act is None:
      return
    if not isinstance(act, ActQuant):
      raise ValueError(f"QuantSpec.activations must be a lowbit_jax.ActQuant or None, got {act!r}")
    fp8 = self.format in (Format.FP8_E4M3, Format.FP8_E5M2)
    if not (fp8 or self.format is Format.TERNARY or (self.format is Format.INT and self.bits == 8)):
      raise ValueError(f"QuantSpec.activations: 8-bit activations need 8-bit INT or FP8 weights (W8A8), or "
                       f"ternary weights (BitNet b1.58's W1.58A8), got {self.format} with bits={self.bits}")
    if self.zero_point is ZeroPoint.FLOAT:
      raise ValueError("QuantSpec.activations: 8-bit activations need integer (or implicit) zero points; a float "
                       "offset (ZeroPoint.FLOAT) has no integer matmul")
    if self.format is not Format.INT and act.outlier_threshold is not None:
      raise ValueError(f"QuantSpec.activations: LLM.int8()'s outlier_threshold needs 8-bit INT weights, got "
                       f"{self.format}")

  @property
  def axis(self) -> int:
    """The contraction axis (where codes are packed and groups are cut)."""
    return self.granularity.axis

  @property
  def group_size(self) -> int | None:
    return self.granularity.size if isinstance(self.granularity, PerGroup) else None

  @property
  def codes_per_byte(self) -> int:
    """How many codes of this width share one byte along the packing axis (3-bit: 8 codes in 3 bytes)."""
    return {8: 1, 4: 2, 3: 8, 2: 4}[self.bits]


# --- Presets: the formats of the literature, with the papers' defaults. Each returns a plain QuantSpec. ---

def int_spec(bits: int, *, group_size: int | None = None, symmetric: bool = True, axis: int = -2,
             scale_dtype=jnp.float32, strict: bool = False, grid: SymGrid | None = None,
             zero_point: ZeroPoint | None = None, clip: ClipSearch | None = None) -> QuantSpec:
  """Uniform integer codes; per-channel when `group_size` is None, else per-group.

  Example (the stored cost: `bits` per code plus one `scale_dtype` scale per group or output channel)::

    >>> import jax.numpy as jnp
    >>> import lowbit_jax as lb
    >>> spec = lb.int_spec(4, group_size=128)
    >>> spec.format.name, spec.bits, spec.granularity, spec.grid.name
    ('INT', 4, PerGroup(size=128, axis=-2), 'SIGNED_MAX')
    >>> lb.quantize(jnp.ones((256, 64)), spec).bits_per_weight          # 4 + 32 / 128
    4.25
    >>> lb.int_spec(8).granularity                                       # group_size=None: one scale per column
    PerChannel(axis=-2)
    >>> lb.quantize(jnp.ones((256, 64)), lb.int_spec(8)).bits_per_weight  # 8 + 32 / 256
    8.125
  """
  gran = PerChannel(axis=axis) if group_size is None else PerGroup(size=group_size, axis=axis)
  return QuantSpec(format=Format.INT, bits=bits, granularity=gran, symmetric=symmetric,
                   scale_dtype=scale_dtype, strict=strict, grid=grid, zero_point=zero_point, clip=clip)


def q4_0_spec(*, axis: int = -2) -> QuantSpec:
  """llama.cpp's Q4_0 block: 4-bit codes in groups of 32 with one fp16 scale, x = d * (q - 8), the scale set so
  that the group's largest-magnitude value lands on -8 (grid SIGNED_MAX); 4.5 bits per weight."""
  return int_spec(4, group_size=32, axis=axis, scale_dtype=jnp.float16, grid=SymGrid.SIGNED_MAX)


def q8_0_spec(*, axis: int = -2) -> QuantSpec:
  """llama.cpp's Q8_0 block: int8 codes in groups of 32 with one fp16 scale absmax / 127 (grid RESTRICTED);
  8.5 bits per weight."""
  return int_spec(8, group_size=32, axis=axis, scale_dtype=jnp.float16, grid=SymGrid.RESTRICTED)


def q4_1_spec(*, group_size: int = 32, axis: int = -2) -> QuantSpec:
  """llama.cpp's Q4_1 layout: 4-bit codes, groups of 32, fp16 scale d and fp16 offset m, x ≈ d*q + m
  (5.0 bits per weight at g32)."""
  return int_spec(4, group_size=group_size, symmetric=False, zero_point=ZeroPoint.FLOAT, axis=axis,
                  scale_dtype=jnp.float16)


def nf4_spec(*, block_size: int = 64, double_quant: bool = True, axis: int = -2,
             clip: ClipSearch | None = None) -> QuantSpec:
  """QLoRA's NF4: blocks of 64 with absmax scales, double-quantized to 8 bits in blocks of 256.

  Example (double quantization stores the block scales as 8-bit codes, in blocks of 256 along the output axis:
  about 4.13 bits per weight instead of 4.5 when that axis is a multiple of 256)::

    >>> import jax, jax.numpy as jnp
    >>> import lowbit_jax as lb
    >>> spec = lb.nf4_spec()
    >>> spec.format.name, spec.granularity, spec.double_quant
    ('NF4', PerGroup(size=64, axis=-2), True)
    >>> w = jax.random.normal(jax.random.PRNGKey(0), (128, 256))
    >>> q = lb.quantize(w, spec)
    >>> round(q.bits_per_weight, 3), lb.quantize(w, lb.nf4_spec(double_quant=False)).bits_per_weight
    (4.127, 4.5)
    >>> bool(jnp.mean(jnp.abs(q.dequantize() - w)) < 0.1)
    True
  """
  return QuantSpec(format=Format.NF4, granularity=PerGroup(size=block_size, axis=axis), double_quant=double_quant,
                   clip=clip)


def fp8_spec(fmt: Format = Format.FP8_E4M3, *, per_channel: bool = False, axis: int = -2) -> QuantSpec:
  """FP8 (E4M3 or E5M2) with a per-tensor (default) or per-channel scale."""
  if fmt not in (Format.FP8_E4M3, Format.FP8_E5M2):
    raise ValueError(f"fp8_spec: expected Format.FP8_E4M3 or Format.FP8_E5M2, got {fmt}")
  as_bool(per_channel, "fp8_spec: per_channel")
  return QuantSpec(format=fmt, granularity=PerChannel(axis=axis) if per_channel else PerTensor(axis=axis))


def ternary_spec(*, per_channel: bool = False, axis: int = -2) -> QuantSpec:
  """BitNet b1.58: codes {-1, 0, +1}, absmean scale per tensor (the paper) or per channel."""
  as_bool(per_channel, "ternary_spec: per_channel")
  return QuantSpec(format=Format.TERNARY,
                   granularity=PerChannel(axis=axis) if per_channel else PerTensor(axis=axis))
