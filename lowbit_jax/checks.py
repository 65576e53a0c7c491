"""Validation shared by every public entry: one helper per rule, so a rule is written (and worded) once.

Every helper raises `ValueError` naming the argument (or key path) and what was expected; type checks are strict:
a bool field takes a bool only, an int field an int (or numpy integer) but not a bool, a float field a finite real
number but not a bool, an enum field a member of that enum (never its string value).

Also here: `DegenerateStatisticsWarning` (calibration statistics an algorithm cannot use for a weight, which it
then quantizes round-to-nearest instead; `strict=True` raises), `check_finite_outputs` (the one-reduction-per-leaf
finiteness check every quantizer runs on what it returns), and `third_party_errors` (context for an error raised
by a user's function or a library under one of our entry points).
"""
from __future__ import annotations

import contextlib
import enum
import math
import os
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np


class DegenerateStatisticsWarning(RuntimeWarning):
  """Calibration statistics of a weight that an algorithm detects as unusable (all zero, constant, overflowing):
  the weight (or the named layers of a stack) is quantized without them, round-to-nearest. Pass `strict=True` to
  the algorithm to raise instead."""


class ApplyFnError(ValueError):
  """An exception raised inside a user's function (or a library it calls) while one of our entry points ran it;
  the message says which entry point and what failed, the original exception is its `__cause__`."""


def _got(value) -> str:
  return f"{value!r} ({type(value).__name__})"


def as_bool(value, name: str) -> bool:
  """`value` if it is a bool (numpy bools included), else ValueError naming `name`."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be a bool, got {_got(value)}")
  return bool(value)


def as_int(value, name: str, *, low: int | None = None, choices: tuple[int, ...] | None = None) -> int:
  """`value` as an int: an int or numpy integer (not a bool), >= `low`, one of `choices` when given."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    want = f"one of {choices}" if choices else "an int" + (f" >= {low}" if low is not None else "")
    raise ValueError(f"{name} must be {want}, got {_got(value)}")
  value = int(value)
  if choices is not None and value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")
  if low is not None and value < low:
    raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
  return value


def as_float(value, name: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
             high_open: bool = False, note: str = "") -> float:
  """`value` as a finite float (ints and numpy reals accepted, bools not) within the given bounds; `note` is
  appended to the message (e.g. the paper's default)."""
  lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
  hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
  want = f"a finite float in {lo}, {hi}" if low is not None and high is not None else (
      f"a finite float {'>' if low_open else '>='} {low:g}" if low is not None else
      f"a finite float {'<' if high_open else '<='} {high:g}" if high is not None else "a finite float")
  ok = not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))
  v = float(value) if ok else math.nan
  ok = ok and math.isfinite(v)
  if ok and low is not None:
    ok = v > low if low_open else v >= low
  if ok and high is not None:
    ok = v < high if high_open else v <= high
  if not ok:
    raise ValueError(f"{name} must be {want}{note}, got {_got(value)}")
  return v


def check_enum(value, cls: type[enum.Enum], name: str, *, optional: bool = False) -> None:
  """`value` is a member of `cls` (or None when `optional`); a string spelling of a member is refused."""
  if optional and value is None:
    return
  if not isinstance(value, cls):
    members = ", ".join(f"{cls.__name__}.{m.name}" for m in cls)
    raise ValueError(f"{name} must be a lowbit_jax.{cls.__name__} ({members}){' or None' if optional else ''}, "
                     f"got {_got(value)}")


def check_array(x, name: str) -> None:
  """`x` is an array (numpy, jax, or a tracer of one); lists, scalars and None are refused."""
  if not isinstance(x, (np.ndarray, jax.Array)):
    raise ValueError(f"{name} must be a jax or numpy array (e.g. jnp.asarray(...)), got {type(x).__name__}")


def check_text(text, name: str) -> None:
  if not isinstance(text, str):
    raise ValueError(f"{name} must be a str, got {_got(text)}")


def token_ids(ids, vocab_size: int, name: str) -> np.ndarray:
  """`ids` as an int64 vector: a sequence (or 1-D array) of integers in [0, vocab_size); floats, bools, strings
  and None are refused (an id is never rounded)."""
  if isinstance(ids, (str, bytes)) or ids is None or not hasattr(ids, "__len__"):
    raise ValueError(f"{name} must be a sequence of int token ids, got {_got(ids)}")
  if len(ids) == 0:
    return np.zeros((0,), np.int64)
  for i, t in enumerate(ids if not isinstance(ids, (np.ndarray, jax.Array)) else ()):
    if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer, np.ndarray, jax.Array)):
      raise ValueError(f"{name}[{i}] must be an int token id, got {_got(t)}")
  arr = np.asarray(ids)
  if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{name} must be a 1-D sequence of int token ids, got dtype {arr.dtype} and shape {arr.shape}")
  bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
  if bad.size:
    raise ValueError(f"token id {int(arr[bad[0]])} ({name}[{int(bad[0])}]) is outside the {vocab_size}-token "
                     f"vocabulary")
  return arr.astype(np.int64)


def check_finite_outputs(named: Iterable[tuple[str, Any]], op: str) -> None:
  """Every floating leaf (scales, offsets, in_scales) of every (where, tree) pair is finite: one `isfinite`
  reduction per leaf, fetched together; ValueError naming the first bad leaf otherwise. Abstract leaves (under
  `jit` / `eval_shape`) have no values and are skipped."""
  flags, names = [], []
  for where, tree in named:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if isinstance(leaf, (jax.core.Tracer, jax.ShapeDtypeStruct)):
        continue
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        flags.append(jnp.all(jnp.isfinite(leaf)))
        names.append(where + jax.tree_util.keystr(path))
  if not flags:
    return
  ok = np.asarray(jax.device_get(jnp.stack(flags)))
  if not ok.all():
    bad = names[int(np.argmin(ok))]
    raise ValueError(f"{bad}: {op} produced NaN/inf (the weight's range overflows what its format stores); "
                     f"expected finite weights of a magnitude the format can scale")


def _ours(filename: str) -> bool:
  import lowbit_jax
  import lowbit_jax.passes as passes
  roots = (os.path.dirname(lowbit_jax.__file__), os.path.dirname(passes.__file__))
  return any(os.path.abspath(filename).startswith(r + os.sep) for r in roots)


@contextlib.contextmanager
def third_party_errors(context: str) -> Iterator[None]:
  """Re-raise an exception from code outside lowbit_jax (the user's function, Flax, transformers, ...) as an
  `ApplyFnError` prefixed by `context`, `from` the original; our own exceptions pass unchanged."""
  try:
    yield
  except Exception as e:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
      tb = tb.tb_next
    if isinstance(e, ApplyFnError) or (tb is not None and _ours(tb.tb_frame.f_code.co_filename)):
      raise
    raise ApplyFnError(f"{context}: {type(e).__name__}: {e}") from e
