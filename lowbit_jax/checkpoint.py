"""Checkpoints of packed parameter trees: `save(path, tree)` stores exactly the bytes a quantized tree holds (uint8
codes, scales, zero points, in_scales and float leaves as they are) with orbax; `restore(path)` gives the same tree
back, QArrays included, bit for bit.

On-disk layout of a checkpoint directory `path`:

    path/arrays/     an orbax PyTree checkpoint of one flat dict {"a0": array, "a1": ...}, each array in its own
                     uncompressed zarr directory `arrays/a<i>/` (no OCDBT): the bytes on disk are the bytes in memory
                     plus ~0.2 kB of metadata per array, and every file belongs to one array. Absent if no arrays.
    path/lowbit_checkpoint.json   the sidecar, written last: {"format", "version", "tree", "files", "sha256"}.
      "tree" describes the pytree: {"dict": [[key, node], ...]}, {"list": [...]}, {"tuple": [...]}, null (None),
      {"array": {"name", "shape", "dtype", "sha256"}} and {"qarray": {"spec", "k", "dtype", "perm", "codes", "scale",
      "zero", "in_scale"}} (a double-quantized scale is a nested "qarray"; "spec" is `spec_to_json(spec)`). "files"
      maps every file under arrays/ to its size. "sha256" hashes the canonical JSON (sorted keys, no spaces) of
      {"tree", "files"}; each array's "sha256" hashes its C-order bytes.

Invariants:
  * `restore(path)` equals the saved tree: same containers, QArray aux data (spec, k_shape, dtype, perm) and array
    bytes, shapes and dtypes. A missing or truncated file, an array failing its SHA-256, or an altered sidecar raises
    `CheckpointError` naming `path`, and the key path of the array when the damage is one array's.
  * Atomic: everything is written and fsync'ed into a temporary sibling `.NAME.tmp-*` and renamed to `path` at the
    end, so `path` is absent, the previous checkpoint or the complete new one. An existing `path` is replaced only
    with `overwrite=True`, and only if it is a checkpoint itself; a crash between moving it aside (`.NAME.old-*`)
    and renaming the new one in leaves no `path`, never a partial one. A save that raises removes its temporary
    directory; one killed outright leaves a `.NAME.tmp-*` sibling, safe to delete.
  * `save` never modifies its input. Single-process only: every array is gathered to the host to be hashed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import DictKey, GetAttrKey, SequenceKey, keystr

from lowbit_jax.io.loaded import CheckpointError
from lowbit_jax.qarray import QArray
from lowbit_jax.spec_json import dtype_from_name, spec_from_json, spec_to_json

__all__ = ["save", "restore", "spec_to_json", "spec_from_json", "CheckpointError", "SIDECAR", "ARRAYS"]  # spec_*: re-exported

SIDECAR = "lowbit_checkpoint.json"
ARRAYS = "arrays"
_FORMAT, _VERSION = "lowbit_jax.checkpoint", 1
_QCHILDREN = ("codes", "scale", "zero", "in_scale")
# --- the tree description ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Entry:
  """One stored array: its orbax key `name`, the key path it sits at, its shape, dtype and SHA-256."""
  name: str
  path: str
  shape: tuple[int, ...]
  dtype: np.dtype
  sha256: str


def _digest(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data).hexdigest()


def _host(x: Any, path: tuple) -> np.ndarray:
  """`x` as a host numpy array (no copy of a numpy input); TypeError naming `path` for a non-array leaf."""
  where = keystr(path) or "<root>"
  if isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct)) or not hasattr(x, "dtype") or not hasattr(x, "shape"):
    raise TypeError(f"checkpoint.save: {where} is a {type(x).__name__}; expected a concrete array (numpy or jax), "
                    f"a QArray, or a dict / list / tuple / None node")
  a = np.asarray(x)
  if a.dtype.hasobject:
    raise TypeError(f"checkpoint.save: {where} has dtype {a.dtype}; expected a numeric array")
  return a


def _describe(x: Any, path: tuple, arrays: dict[str, np.ndarray]) -> Any:
  """The sidecar's JSON node for `x`; adds every array under it to `arrays` (name -> host array)."""
  if x is None:
    return None
  if isinstance(x, QArray):
    node = {"spec": spec_to_json(x.spec), "k": list(x.k_shape), "dtype": x.dtype.name,
            "perm": None if x.perm is None else list(x.perm)}
    node.update({c: _describe(getattr(x, c), path + (GetAttrKey(c),), arrays) for c in _QCHILDREN})
    return {"qarray": node}
  if type(x) is dict:
    bad = [k for k in x if not isinstance(k, str)]
    if bad:
      raise TypeError(f"checkpoint.save: {keystr(path) or '<root>'} has non-string keys {bad}; expected str keys")
    return {"dict": [[k, _describe(v, path + (DictKey(k),), arrays)] for k, v in x.items()]}
  if type(x) in (list, tuple):
    return {type(x).__name__: [_describe(v, path + (SequenceKey(i),), arrays) for i, v in enumerate(x)]}
  a = _host(x, path)
  name = f"a{len(arrays)}"
  arrays[name] = a
  return {"array": {"name": name, "shape": list(a.shape), "dtype": a.dtype.name, "sha256": _digest(a)}}


def _rebuild(node: Any, path: tuple) -> Any:
  """The tree a sidecar node describes, with an `_Entry` at every array."""
  if node is None:
    return None
  (kind, body), = node.items()
  if kind == "array":
    return _Entry(str(body["name"]), keystr(path) or "<root>", tuple(int(n) for n in body["shape"]),
                  dtype_from_name(body["dtype"]), str(body["sha256"]))
  if kind == "qarray":
    children = {c: _rebuild(body[c], path + (GetAttrKey(c),)) for c in _QCHILDREN}
    return QArray(**children, spec=spec_from_json(body["spec"]), k=body["k"], dtype=dtype_from_name(body["dtype"]),
                  perm=body["perm"])
  if kind == "dict":
    return {str(k): _rebuild(v, path + (DictKey(k),)) for k, v in body}
  if kind in ("list", "tuple"):
    items = [_rebuild(v, path + (SequenceKey(i),)) for i, v in enumerate(body)]
    return items if kind == "list" else tuple(items)
  raise ValueError(f"unknown node kind {kind!r} at {keystr(path) or '<root>'}")


def _canonical(tree: Any) -> bytes:
  return json.dumps(tree, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


# --- save -------------------------------------------------------------------------------------------------------

def save(path: str | os.PathLike, tree: Any, *, overwrite: bool = False) -> None:
  """Writes `tree` (dicts with str keys, lists, tuples, None, QArrays and concrete arrays) to the directory `path`.

  Raises:
    FileExistsError: `path` exists and `overwrite` is False, or it exists and is not a checkpoint (never replaced).
    TypeError: a leaf is not a concrete array (a tracer, a ShapeDtypeStruct, a Python scalar) or a node is of an
      unsupported type; the message names its key path.
  """
  path = Path(path).absolute()
  _check_replaceable(path, overwrite)
  arrays: dict[str, np.ndarray] = {}
  described = _describe(tree, (), arrays)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _sibling(path, "tmp")
  os.mkdir(tmp)     # honours the umask, unlike tempfile.mkdtemp's 0o700
  try:
    _write_arrays(tmp / ARRAYS, arrays)
    _write_sidecar(tmp / SIDECAR, _sidecar(described, _file_sizes(tmp / ARRAYS)))
    _fsync_tree(tmp)
    _commit(tmp, path, overwrite)
  except BaseException:
    _discard(tmp)
    raise


def _check_replaceable(path: Path, overwrite: bool) -> None:
  if not os.path.lexists(path):
    return
  if not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace a checkpoint")
  if not (path / SIDECAR).is_file():
    raise FileExistsError(f"{path} exists and is not a lowbit_jax checkpoint (no {SIDECAR}); refusing to replace it")


def _orbax():
  import orbax.checkpoint as ocp   # noqa: PLC0415  (on first use: orbax takes seconds to import)
  return ocp


def _checkpointer():
  """One zarr directory per array, uncompressed: on-disk bytes == in-memory bytes, and a file names its array."""
  ocp = _orbax()
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_compression=False))


def _write_arrays(directory: Path, arrays: dict[str, np.ndarray]) -> None:
  if not arrays:     # orbax refuses an empty tree; a tree without arrays has no `arrays/`
    return
  with _checkpointer() as checkpointer:
    checkpointer.save(directory, args=_orbax().args.PyTreeSave(arrays))


def _file_sizes(root: Path) -> dict[str, int]:
  """Every file under `root` ('/'-separated path relative to it) -> its size in bytes."""
  return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def _sidecar(tree: Any, files: dict[str, int]) -> dict:
  body = {"tree": tree, "files": files}
  return {"format": _FORMAT, "version": _VERSION, **body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()}


def _write_sidecar(file: Path, sidecar: dict) -> None:
  with open(file, "w", encoding="utf-8") as f:
    json.dump(sidecar, f, separators=(",", ":"), allow_nan=False)


def _fsync_tree(root: Path) -> None:
  """fsync every file, then every directory (deepest first), under `root`."""
  for top, dirs, files in os.walk(root, topdown=False):
    for name in files:
      _fsync(os.path.join(top, name))
    _fsync(top)


def _fsync(p: str | os.PathLike) -> None:
  fd = os.open(p, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _commit(tmp: Path, path: Path, overwrite: bool) -> None:
  """Renames the complete `tmp` to `path`, moving a previous checkpoint aside first and deleting it after."""
  _check_replaceable(path, overwrite)
  old = _sibling(path, "old") if os.path.lexists(path) else None
  if old is not None:
    os.rename(path, old)
  try:
    os.rename(tmp, path)
  except BaseException:
    if old is not None:
      os.rename(old, path)    # put the previous checkpoint back
    raise
  _fsync(path.parent)
  if old is not None:
    shutil.rmtree(old)


def _sibling(path: Path, role: str) -> Path:
  """A fresh hidden name beside `path`: `.NAME.tmp-<random hex>` (or `.old-`)."""
  return path.parent / f".{path.name}.{role}-{secrets.token_hex(8)}"


def _discard(tmp: Path) -> None:
  shutil.rmtree(tmp, ignore_errors=True)


# --- restore ----------------------------------------------------------------------------------------------------

def restore(path: str | os.PathLike, like: Any = None, *, sharding: Any = None) -> Any:
  """The tree saved at `path`, with jax.Array leaves.

  Args:
    like: None, or a tree the checkpoint must match (containers, keys, QArray specs / k_shape / dtype / perm,
      leaf shapes and dtypes; leaves may be arrays or `jax.ShapeDtypeStruct`s). A leaf of `like` that carries a
      sharding places the restored leaf there unless `sharding` says otherwise.
    sharding: None (the default device), one `jax.sharding.Sharding` for every leaf, or a pytree *prefix* of the
      tree whose leaves are Shardings (or None: the default device) applying to every array below them, e.g.
      ``{"w": lb.qarray_sharding(q, mesh, "model"), "emb": NamedSharding(mesh, P())}``.

  Raises:
    CheckpointError: no checkpoint at `path`; a corrupted or unknown sidecar; a missing, unreadable, truncated or
      altered array (the message names the key path); a mismatch with `like` (key path, expected and stored).
    ValueError: `sharding` does not fit the tree.
  """
  path = Path(path).absolute()
  desc, files = _read_sidecar(path)
  if like is not None:
    _check_like(path, desc, like, ())
  places = _placements(desc, sharding, like)
  entries = jax.tree.leaves(desc)
  _check_files(path, files, entries)
  host = _read_arrays(path, entries)
  return jax.tree.map(lambda e: jax.device_put(host[e.name], places.get(e.name)), desc)


def _read_sidecar(path: Path) -> tuple[Any, dict[str, int]]:
  """The stored tree (an `_Entry` at every array) and the size of every file under `arrays/`."""
  file = path / SIDECAR
  if not file.is_file():
    raise CheckpointError(path, f"no checkpoint here (no {SIDECAR}: not a checkpoint, or its save did not finish)")
  try:
    sidecar = json.loads(file.read_bytes())
    if sidecar["format"] != _FORMAT or sidecar["version"] != _VERSION:
      raise ValueError(f"format {sidecar['format']!r} version {sidecar['version']!r}, expected {_FORMAT!r} "
                       f"version {_VERSION}")
    body = {"tree": sidecar["tree"], "files": sidecar["files"]}
    if hashlib.sha256(_canonical(body)).hexdigest() != sidecar["sha256"]:
      raise ValueError("its content does not match its sha256")
    return _rebuild(sidecar["tree"], ()), {str(k): int(v) for k, v in sidecar["files"].items()}
  except (ValueError, KeyError, TypeError, AttributeError) as e:   # json.JSONDecodeError is a ValueError
    raise CheckpointError(path, f"corrupted sidecar {SIDECAR}: {type(e).__name__}: {e}") from e


def _check_files(path: Path, files: dict[str, int], entries: list[_Entry]) -> None:
  """Every file the save wrote under `arrays/` is there with its size, so that a missing or truncated file is
  reported (with the key path of the array whose directory `arrays/<name>/` holds it) before orbax reads it."""
  owners = {e.name: e.path for e in entries}
  for rel, size in files.items():
    file = path / ARRAYS / rel
    found = file.stat().st_size if file.is_file() else None
    if found != size:
      owner = owners.get(rel.split("/")[0])
      problem = "is missing" if found is None else f"has {found} bytes, expected {size}"
      raise CheckpointError(path, f"{owner + ': stored array' if owner else 'orbax'} file {ARRAYS}/{rel} {problem}")


def _read_arrays(path: Path, entries: list[_Entry]) -> dict[str, np.ndarray]:
  """Every entry's array read from `path/arrays` and verified; on a failed read, each array alone to name it."""
  if not entries:
    return {}
  try:
    out = _orbax_read(path, entries)
  except Exception as e:    # orbax / tensorstore raise ValueError, FileNotFoundError, KeyError, ... on bad files
    for entry in entries:
      try:
        _orbax_read(path, [entry])
      except Exception as one:
        raise CheckpointError(path, f"{entry.path}: stored array {ARRAYS}/{entry.name} is unreadable "
                                    f"({type(one).__name__}: {one})") from one
    raise CheckpointError(path, f"the arrays are unreadable ({type(e).__name__}: {e})") from e
  for entry in entries:
    _verify(path, entry, out.get(entry.name))
  return out


def _orbax_read(path: Path, entries: list[_Entry]) -> dict[str, np.ndarray]:
  ocp = _orbax()
  item = {e.name: jax.ShapeDtypeStruct(e.shape, e.dtype) for e in entries}
  args = ocp.args.PyTreeRestore(item=item, restore_args={e.name: ocp.RestoreArgs(restore_type=np.ndarray)
                                                         for e in entries}, partial_restore=True)
  with _checkpointer() as checkpointer:
    return checkpointer.restore(path / ARRAYS, args=args)


def _verify(path: Path, entry: _Entry, a: Any) -> None:
  if not isinstance(a, np.ndarray) or a.shape != entry.shape or a.dtype != entry.dtype:
    got = f"{a.shape} {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
    raise CheckpointError(path, f"{entry.path}: stored array {ARRAYS}/{entry.name} is {got}, expected "
                                f"{entry.shape} {entry.dtype}")
  if _digest(a) != entry.sha256:
    raise CheckpointError(path, f"{entry.path}: stored array {ARRAYS}/{entry.name} fails its checksum (sha256 "
                                f"{_digest(a)[:16]}..., expected {entry.sha256[:16]}...): the file is corrupted")


def _mismatch(path: Path, where: tuple, expected: str, stored: str) -> CheckpointError:
  return CheckpointError(path, f"{keystr(where) or '<root>'}: `like` expects {expected}, the checkpoint stores "
                               f"{stored}")


def _kind(x: Any) -> str:
  if x is None:
    return "None"
  if isinstance(x, QArray) or type(x) in (dict, list, tuple):
    return f"a {type(x).__name__}"
  return "an array" if hasattr(x, "shape") and hasattr(x, "dtype") else f"a {type(x).__name__}"


def _check_like(path: Path, desc: Any, like: Any, where: tuple) -> None:
  """Raises CheckpointError at the first key path where `like` differs from the stored description `desc`."""
  if _kind(like) != _kind(desc):
    raise _mismatch(path, where, _kind(like), _kind(desc))
  if isinstance(desc, QArray):
    for attr in ("spec", "k_shape", "dtype", "perm"):
      if getattr(like, attr) != getattr(desc, attr):
        raise _mismatch(path, where, f"{attr} {getattr(like, attr)}", f"{attr} {getattr(desc, attr)}")
    for c in _QCHILDREN:
      _check_like(path, getattr(desc, c), getattr(like, c), where + (GetAttrKey(c),))
  elif isinstance(desc, dict):
    if like.keys() != desc.keys():
      raise _mismatch(path, where, f"keys {sorted(like)}", f"keys {sorted(desc)}")
    for k in desc:
      _check_like(path, desc[k], like[k], where + (DictKey(k),))
  elif isinstance(desc, (list, tuple)):
    if len(like) != len(desc):
      raise _mismatch(path, where, f"length {len(like)}", f"length {len(desc)}")
    for i, (d, l) in enumerate(zip(desc, like)):
      _check_like(path, d, l, where + (SequenceKey(i),))
  elif desc is not None and (tuple(like.shape) != desc.shape or jnp.dtype(like.dtype) != desc.dtype):
    raise _mismatch(path, where, f"{tuple(like.shape)} {jnp.dtype(like.dtype)}", f"{desc.shape} {desc.dtype}")


def _is_placement(x: Any) -> bool:
  return x is None or isinstance(x, jax.sharding.Sharding)


def _placements(desc: Any, sharding: Any, like: Any) -> dict[str, jax.sharding.Sharding]:
  """Array name -> Sharding: from `sharding` (a prefix of the tree), else from `like`'s leaves; absent: default."""
  places = {}
  if like is not None:
    for entry, leaf in zip(jax.tree.leaves(desc), jax.tree.leaves(like)):
      if isinstance(getattr(leaf, "sharding", None), jax.sharding.Sharding):
        places[entry.name] = leaf.sharding
  if sharding is None:
    return places
  prefix, treedef = jax.tree_util.tree_flatten(sharding, is_leaf=_is_placement)
  try:
    subtrees = treedef.flatten_up_to(desc)
  except (ValueError, TypeError) as e:
    raise ValueError(f"checkpoint.restore: `sharding` must be a Sharding or a pytree prefix of the checkpoint's tree "
                     f"(QArrays as qarray_sharding returns them); {e}") from e
  for s, sub in zip(prefix, subtrees):
    for entry in jax.tree.leaves(sub):
      if s is None:
        places.pop(entry.name, None)
      else:
        places[entry.name] = s
  return places
