"""QuantSpecs as JSON values (checkpoint sidecars): every field of every spec dataclass, enums and dtypes tagged,
so a spec round-trips exactly and an unknown or missing field is an error, never a silent default."""
from __future__ import annotations

import dataclasses
import enum
from typing import Any

import jax.numpy as jnp
import numpy as np

from lowbit_jax.spec import (ActQuant, ClipSearch, Format, PerChannel, PerGroup, PerTensor, QuantSpec, SymGrid,
                             ZeroPoint)

__all__ = ["spec_to_json", "spec_from_json", "dtype_from_name"]

_DATACLASSES = {c.__name__: c for c in (QuantSpec, PerTensor, PerChannel, PerGroup, ActQuant, ClipSearch)}
_ENUMS = {c.__name__: c for c in (Format, SymGrid, ZeroPoint)}



def spec_to_json(spec: QuantSpec) -> dict:
  """A JSON value for `spec`: every field of every dataclass ({"type", "fields"}), enums as {"enum", "value"},
  dtypes as {"dtype"}. Raises TypeError on a value of a type it has no encoding for (a new field type must be
  added here, never silently dropped)."""
  if not isinstance(spec, QuantSpec):
    raise TypeError(f"spec_to_json: expected a QuantSpec, got {type(spec).__name__}")
  return _encode(spec)


def spec_from_json(obj: Any) -> QuantSpec:
  """The QuantSpec `spec_to_json` encoded. Raises ValueError on an unknown type, enum, field or a missing field."""
  spec = _decode(obj)
  if not isinstance(spec, QuantSpec):
    raise ValueError(f"spec_from_json: expected an encoded QuantSpec, got {type(spec).__name__}")
  return spec


def _encode(v: Any) -> Any:
  if v is None or isinstance(v, (bool, str)):
    return v
  if isinstance(v, (int, float)) and not isinstance(v, (np.integer, np.floating)):
    return v
  if isinstance(v, enum.Enum) and _ENUMS.get(type(v).__name__) is type(v):
    return {"enum": type(v).__name__, "value": v.value}
  if isinstance(v, np.dtype):
    return {"dtype": v.name}
  if dataclasses.is_dataclass(v) and _DATACLASSES.get(type(v).__name__) is type(v):
    return {"type": type(v).__name__, "fields": {f.name: _encode(getattr(v, f.name)) for f in dataclasses.fields(v)}}
  raise TypeError(f"spec_to_json: no JSON encoding for {v!r} of type {type(v).__name__}")


def _decode(obj: Any) -> Any:
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  if not isinstance(obj, dict):
    raise ValueError(f"spec_from_json: unexpected JSON value {obj!r}")
  if obj.keys() == {"enum", "value"}:
    return _known(obj["enum"], _ENUMS)(obj["value"])
  if obj.keys() == {"dtype"}:
    return dtype_from_name(obj["dtype"])
  if obj.keys() == {"type", "fields"}:
    cls = _known(obj["type"], _DATACLASSES)
    names = {f.name for f in dataclasses.fields(cls)}
    if obj["fields"].keys() != names:
      raise ValueError(f"spec_from_json: {cls.__name__} has fields {sorted(names)}; got unknown "
                       f"{sorted(obj['fields'].keys() - names)}, missing {sorted(names - obj['fields'].keys())}")
    return cls(**{k: _decode(v) for k, v in obj["fields"].items()})
  raise ValueError(f"spec_from_json: unexpected JSON object with keys {sorted(obj)}")


def _known(name: Any, table: dict) -> type:
  if not isinstance(name, str) or name not in table:
    raise ValueError(f"spec_from_json: unknown type {name!r}; expected one of {sorted(table)}")
  return table[name]


def dtype_from_name(name: Any) -> np.dtype:
  """The dtype named `name` (e.g. 'bfloat16'); ValueError for an unknown name."""
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ValueError(f"unknown dtype {name!r}") from e
