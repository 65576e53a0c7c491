"""lowbit_jax.checkpoint: bitwise round trips of mixed float / QArray trees, on-disk size, sharded restore on the 8
host devices of conftest, corruption and interrupted saves."""
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import lowbit_jax as lb
from lowbit_jax import checkpoint as ck
from lowbit_jax.io.loaded import CheckpointError
from lowbit_jax.qarray import QArray, dq_spec, with_in_scale
from qhelpers import REGISTRY

G32 = lb.int_spec(4, group_size=32)


def _w(seed, shape, dtype=np.float32):
  """Random leaves of `shape`: normal floats (bfloat16 and float8 included), uniform uint8."""
  rng = np.random.default_rng(seed)
  if np.dtype(dtype) == np.uint8:
    return rng.integers(0, 256, shape, dtype=np.uint8)
  return (0.1 * rng.standard_normal(shape)).astype(dtype)


def _q(seed, shape, spec, dtype=np.float32, quantize=lb.quantize):
  """A QArray exactly as `quantize(x, spec)` structures it (traced by eval_shape: no compilation), filled with
  random codes and scales: the checkpoint only moves bytes."""
  abstract = jax.eval_shape(lambda x: quantize(x, spec), jax.ShapeDtypeStruct(shape, dtype))
  leaves, treedef = jax.tree.flatten(abstract)
  return jax.tree.unflatten(treedef, [_w(seed + i, l.shape, l.dtype) for i, l in enumerate(leaves)])


def _mixed():
  q = _q(9, (64, 32), G32)
  in_scale = lambda x, spec: with_in_scale(x, jnp.linspace(0.5, 2.0, 64), spec)
  return {
      "embed": _w(0, (16, 32)),
      "norm": _w(1, (32,), jnp.bfloat16),
      "int4_g32": _q(2, (64, 32), G32),
      "asym": _q(3, (64, 32), lb.int_spec(4, group_size=32, symmetric=False)),
      "q4_1": _q(4, (64, 32), lb.q4_1_spec()),
      "nf4_dq": _q(5, (128, 32), lb.nf4_spec()),
      "fp8": _q(6, (64, 32), lb.fp8_spec()),
      "ternary": _q(7, (64, 32), lb.ternary_spec()),
      "int8_channel": _q(8, (64, 32), lb.int_spec(8), jnp.bfloat16),
      "in_scale": _q(10, (64, 32), G32, quantize=in_scale),
      "stacked": _q(11, (3, 64, 32), G32),
      "block": QArray(q.codes, q.scale, q.zero, spec=q.spec, k=(4, 16), dtype=q.dtype, perm=(1, 0, 2)),
      "layers": [{"w": _q(12 + i, (64, 32), G32), "b": jnp.asarray(_w(20 + i, (32,)))} for i in range(2)],
      "misc": (np.arange(5, dtype=np.int32), None, np.asarray(3.0, np.float32)),
  }


@pytest.fixture(scope="module")
def tree():
  return _mixed()


@pytest.fixture(scope="module")
def saved(tree, tmp_path_factory):
  path = tmp_path_factory.mktemp("saved") / "ckpt"
  ck.save(path, tree)
  return path


def assert_same(a, b):
  """Same treedef (containers, QArray spec / k_shape / dtype / perm) and bitwise-equal leaves."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert (x.shape, x.dtype) == (y.shape, y.dtype)
    assert x.tobytes() == y.tobytes()


def _copy(saved, tmp_path) -> Path:
  dst = tmp_path / "copy"
  shutil.copytree(saved, dst)
  return dst


def _array_name(path: Path, *keys) -> str:
  """The stored array at a key path, read from the sidecar (its layout is documented in checkpoint.py)."""
  node = json.loads((path / ck.SIDECAR).read_text())["tree"]
  for k in keys:
    (kind, body), = node.items()
    node = dict(body)[k] if kind == "dict" else body[k]
  return node["array"]["name"]


def _data_file(path: Path, *keys) -> Path:
  files = [f for f in (path / ck.ARRAYS / _array_name(path, *keys)).iterdir() if not f.name.startswith(".")]
  assert len(files) == 1, files
  return files[0]


# --- specs ---------------------------------------------------------------------------------------------------

SPECS = {**REGISTRY, "w8a8": lb.W8A8_SPEC, "llm_int8": lb.llm_int8_spec(), "dq_inner": dq_spec(lb.nf4_spec()),
         "strict_axis_m1": lb.int_spec(4, group_size=32, strict=True, axis=-1)}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_spec_json_round_trip(name):
  spec = SPECS[name]
  text = json.dumps(ck.spec_to_json(spec))
  assert ck.spec_from_json(json.loads(text)) == spec


def test_spec_json_rejects_unknown_and_missing_fields():
  good = ck.spec_to_json(lb.nf4_spec(clip=lb.ClipSearch()))
  unknown = json.loads(json.dumps(good))
  unknown["fields"]["clip"]["fields"]["new_knob"] = 1
  missing = json.loads(json.dumps(good))
  del missing["fields"]["dq_group_size"]
  bad_enum = json.loads(json.dumps(good))
  bad_enum["fields"]["format"]["value"] = "int9"
  bad_type = json.loads(json.dumps(good))
  bad_type["fields"]["granularity"]["type"] = "PerBlock"
  for obj, msg in ((unknown, "new_knob"), (missing, "dq_group_size"), (bad_enum, "int9"), (bad_type, "PerBlock")):
    with pytest.raises(ValueError, match=msg):
      ck.spec_from_json(obj)
  odd = lb.int_spec(4)
  object.__setattr__(odd, "clip", object())      # a field value of a type with no encoding
  with pytest.raises(TypeError, match="no JSON encoding"):
    ck.spec_to_json(odd)


# --- round trips -----------------------------------------------------------------------------------------------

def test_round_trip_bitwise_with_and_without_target(tree, saved):
  plain = ck.restore(saved)
  assert_same(plain, tree)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(plain))
  assert_same(ck.restore(saved, like=tree), tree)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  assert_same(ck.restore(saved, like=abstract), tree)
  assert plain["fp8"].codes.dtype == jnp.float8_e4m3fn and plain["nf4_dq"].scale.codes.dtype == np.uint8


def test_tree_without_arrays(tmp_path):
  ck.save(tmp_path / "ckpt", {"a": None, "b": [], "c": ()})
  assert ck.restore(tmp_path / "ckpt") == {"a": None, "b": [], "c": ()}


def test_save_does_not_modify_its_input(tmp_path):
  tree = {"q": _q(0, (64, 32), G32), "j": jnp.arange(4.0), "np": np.arange(6, dtype=np.float32).reshape(2, 3)}
  before = jax.tree.map(lambda x: np.array(x, copy=True), tree)
  leaves, treedef = jax.tree.leaves(tree), jax.tree.structure(tree)
  ck.save(tmp_path / "ckpt", tree)
  assert jax.tree.structure(tree) == treedef
  assert all(x is y for x, y in zip(jax.tree.leaves(tree), leaves))
  assert tree["np"].flags.writeable
  assert_same(tree, before)


def test_unsupported_leaves_name_their_key_path(tmp_path):
  with pytest.raises(TypeError, match=r"\['a'\]\[1\]"):
    ck.save(tmp_path / "ckpt", {"a": [np.zeros(2), 1.5]})
  with pytest.raises(TypeError, match=r"\['s'\]"):
    ck.save(tmp_path / "ckpt", {"s": jax.ShapeDtypeStruct((2,), jnp.float32)})
  assert not (tmp_path / "ckpt").exists()


def test_on_disk_size_close_to_memory_report(tmp_path):
  tree = {"w": _q(0, (4096, 1024), G32), "q4_1": _q(1, (1024, 1024), lb.q4_1_spec()),
          "norm": _w(2, (1024,))}
  ck.save(tmp_path / "ckpt", tree)
  disk = sum(f.stat().st_size for f in (tmp_path / "ckpt").rglob("*") if f.is_file())
  mem = lb.memory_report(tree).total_bytes
  print(f"on disk {disk} B, memory_report {mem} B, ratio {disk / mem:.5f}")
  assert mem <= disk <= 1.05 * mem + 64 * 1024


# --- like ------------------------------------------------------------------------------------------------------

def _with(tree, **changes):
  return {**tree, **changes}


LIKE_MISMATCHES = {
    "shape": (lambda t: _with(t, embed=jnp.zeros((16, 33))), r"\['embed'\].*\(16, 33\)"),
    "spec": (lambda t: _with(t, int4_g32=_q(2, (64, 32), lb.int_spec(4, group_size=64))),
             r"\['int4_g32'\]: `like` expects spec"),
    "nested dtype": (lambda t: _with(t, layers=[t["layers"][0], {**t["layers"][1], "b": jnp.zeros(32, jnp.bfloat16)}]),
                     r"\['layers'\]\[1\]\['b'\].*bfloat16"),
    "extra key": (lambda t: _with(t, extra=jnp.zeros(2)), r"<root>: `like` expects keys"),
    "float for QArray": (lambda t: _with(t, fp8=jnp.zeros((64, 32))), r"\['fp8'\].*an array.*a QArray"),
    "list for tuple": (lambda t: _with(t, misc=list(t["misc"])), r"\['misc'\].*a list.*a tuple"),
}


@pytest.mark.parametrize("case", sorted(LIKE_MISMATCHES))
def test_like_mismatch_names_the_key_path(tree, saved, case):
  make, msg = LIKE_MISMATCHES[case]
  with pytest.raises(CheckpointError, match=msg) as e:
    ck.restore(saved, like=make(tree))
  assert str(saved) in str(e.value)


# --- sharding --------------------------------------------------------------------------------------------------

def test_restore_sharded_over_8_devices(tmp_path):
  assert jax.device_count() >= 8, "conftest must force 8 host devices (XLA_FLAGS)"
  mesh = Mesh(np.array(jax.devices()[:8]), ("model",))
  q, stacked = _q(0, (64, 64), G32), _q(1, (2, 64, 64), lb.nf4_spec())
  tree = {"q": q, "stacked": stacked, "emb": _w(2, (16, 64)), "bias": _w(3, (64,))}
  ck.save(tmp_path / "ckpt", tree)
  shardings = {"q": lb.qarray_sharding(q, mesh, "model"), "stacked": lb.qarray_sharding(stacked, mesh, "model"),
               "emb": NamedSharding(mesh, P(None, "model")), "bias": NamedSharding(mesh, P())}
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
  for out in (ck.restore(tmp_path / "ckpt", sharding=shardings), ck.restore(tmp_path / "ckpt", like=abstract)):
    assert_same(out, tree)
    for leaf, want in zip(jax.tree.leaves(out), jax.tree.leaves(shardings), strict=True):
      assert leaf.sharding == want
    assert out["q"].codes.sharding.spec == P(None, "model")
    assert out["q"].codes.addressable_shards[0].data.shape == (32, 8)
  ck.save(tmp_path / "again", out)        # a sharded tree saves as its gathered bytes
  assert_same(ck.restore(tmp_path / "again"), tree)
  replicated = NamedSharding(mesh, P())
  out = ck.restore(tmp_path / "ckpt", sharding=replicated)
  assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(out))
  with pytest.raises(ValueError, match="prefix"):
    ck.restore(tmp_path / "ckpt", sharding={"q": replicated})


# --- corruption ------------------------------------------------------------------------------------------------

def _truncate(f: Path):
  os.truncate(f, f.stat().st_size // 2)


def _flip(f: Path):
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x10
  f.write_bytes(bytes(data))


def _delete_metadata(f: Path):
  (f.parent / ".zarray").unlink()


ARRAY_DAMAGE = {"truncated": _truncate, "bit-flipped": _flip, "deleted": Path.unlink,
                "metadata deleted": _delete_metadata, "metadata bit-flipped": lambda f: _flip(f.parent / ".zarray")}


# A damaged .zarray of the right size reaches orbax, which fails; orbax 0.12.8 then lets a pending tensorstore read
# call back into the event loop it has closed ("Event loop is closed", unraisable); the CheckpointError is unaffected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("keys", [("int4_g32", "codes"), ("nf4_dq", "scale", "codes"), ("layers", 1, "b")])
@pytest.mark.parametrize("damage", sorted(ARRAY_DAMAGE))
def test_damaged_array_file_names_the_key_path(saved, tmp_path, damage, keys):
  path = _copy(saved, tmp_path)
  ARRAY_DAMAGE[damage](_data_file(path, *keys))
  where = "".join(f".{k}" if k in ("codes", "scale") else f"[{k!r}]" for k in keys)
  with pytest.raises(CheckpointError) as e:
    ck.restore(path)
  assert str(e.value).startswith(f"{path}: {where}: stored array"), str(e.value)


def test_damaged_orbax_metadata(saved, tmp_path):
  path = _copy(saved, tmp_path)
  (path / ck.ARRAYS / "_METADATA").unlink()
  with pytest.raises(CheckpointError, match=f"^{path}: orbax file arrays/_METADATA is missing"):
    ck.restore(path)


def _rewrite_sidecar(path: Path, edit):
  """Edits the parsed sidecar and writes it back with a *valid* sha256: only the content check can catch it."""
  sidecar = json.loads((path / ck.SIDECAR).read_text())
  edit(sidecar["tree"])
  sidecar["sha256"] = ck._sidecar(sidecar["tree"], sidecar["files"])["sha256"]
  (path / ck.SIDECAR).write_text(json.dumps(sidecar))


def _edit_shape(tree):
  tree["dict"][0][1]["array"]["shape"][0] += 1


def _unknown_spec_field(tree):
  dict(tree["dict"])["int4_g32"]["qarray"]["spec"]["fields"]["new_knob"] = 1


SIDECAR_DAMAGE = {
    "truncated": lambda p: _truncate(p / ck.SIDECAR),
    "bit-flipped": lambda p: _flip(p / ck.SIDECAR),
    "deleted": lambda p: (p / ck.SIDECAR).unlink(),
    "edited without its checksum": lambda p: (p / ck.SIDECAR).write_text(
        (p / ck.SIDECAR).read_text().replace('"shape":[16,32]', '"shape":[16,31]', 1)),
    "unknown spec field": lambda p: _rewrite_sidecar(p, _unknown_spec_field),
    "wrong shape, valid checksum": lambda p: _rewrite_sidecar(p, _edit_shape),
}


@pytest.mark.parametrize("damage", sorted(SIDECAR_DAMAGE))
def test_damaged_sidecar(saved, tmp_path, damage):
  path = _copy(saved, tmp_path)
  before = (path / ck.SIDECAR).read_bytes()
  SIDECAR_DAMAGE[damage](path)
  assert not (path / ck.SIDECAR).exists() or (path / ck.SIDECAR).read_bytes() != before
  with pytest.raises(CheckpointError, match="^" + str(path)):
    ck.restore(path)


# --- atomicity -------------------------------------------------------------------------------------------------

def _small(seed):
  return {"q": _q(seed, (64, 32), G32), "f": _w(seed + 1, (8,)), "g": _w(seed + 2, (4,))}


def _siblings(path: Path):
  return sorted(p.name for p in path.parent.iterdir() if p != path)


def test_interrupted_save_leaves_no_checkpoint(tmp_path, monkeypatch):
  real = ck._write_arrays
  def some_then_interrupt(directory, arrays):
    real(directory, dict(list(arrays.items())[:2]))
    raise KeyboardInterrupt
  monkeypatch.setattr(ck, "_write_arrays", some_then_interrupt)
  path = tmp_path / "ckpt"
  with pytest.raises(KeyboardInterrupt):
    ck.save(path, _small(0))
  assert not path.exists() and _siblings(path) == []
  with pytest.raises(CheckpointError, match="no checkpoint"):
    ck.restore(path)


def test_interrupted_overwrite_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  path, old, new = tmp_path / "ckpt", _small(0), _small(10)
  ck.save(path, old)
  def half_then_fail(file, sidecar):
    file.write_text(json.dumps(sidecar)[:100])
    raise OSError("disk full")
  monkeypatch.setattr(ck, "_write_sidecar", half_then_fail)
  with pytest.raises(OSError, match="disk full"):
    ck.save(path, new, overwrite=True)
  assert_same(ck.restore(path), old)
  assert _siblings(path) == []


def test_failed_rename_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
  path, old = tmp_path / "ckpt", _small(0)
  ck.save(path, old)
  real = os.rename
  def rename(src, dst):
    if ".tmp-" in str(src):
      raise OSError("rename failed")
    real(src, dst)
  monkeypatch.setattr(os, "rename", rename)
  with pytest.raises(OSError, match="rename failed"):
    ck.save(path, _small(10), overwrite=True)
  monkeypatch.undo()
  assert_same(ck.restore(path), old)
  assert _siblings(path) == []


def test_killed_save_before_rename(tmp_path, monkeypatch):
  """A process killed after writing everything but before the rename: `path` keeps the old checkpoint, a
  `.ckpt.tmp-*` sibling is left behind, and later saves still work."""
  path, old, new = tmp_path / "ckpt", _small(0), _small(10)
  ck.save(path, old)
  with monkeypatch.context() as m:
    m.setattr(ck, "_discard", lambda tmp: None)
    m.setattr(ck, "_commit", lambda tmp, path, overwrite: (_ for _ in ()).throw(SystemExit(9)))
    with pytest.raises(SystemExit):
      ck.save(path, new, overwrite=True)
  assert_same(ck.restore(path), old)
  leftover = _siblings(path)
  assert len(leftover) == 1 and leftover[0].startswith(".ckpt.tmp-")
  ck.save(path, new, overwrite=True)
  assert_same(ck.restore(path), new)
  assert _siblings(path) == leftover


def test_overwrite_policy(tmp_path):
  path, old, new = tmp_path / "ckpt", _small(0), _small(10)
  ck.save(path, old)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    ck.save(path, new)
  assert_same(ck.restore(path), old)
  ck.save(path, new, overwrite=True)
  assert_same(ck.restore(path), new)
  assert _siblings(path) == []
  plain = tmp_path / "not_a_checkpoint"
  plain.mkdir()
  (plain / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not a lowbit_jax checkpoint"):
    ck.save(plain, new, overwrite=True)
  assert (plain / "notes.txt").read_text() == "keep me"
