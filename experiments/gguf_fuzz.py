"""Fuzz `load_gguf` with mutated copies of stories260K.gguf and tabulate what happens to each.

Every mutant must either load (then every parameter has its config's shape and is finite: load_gguf rejects
non-finite weights unless asked) or raise a CheckpointError naming the file, within the per-mutant time limit;
anything else (another exception, a timeout, a load with wrong shapes or non-finite values) is a loader bug.
Mutations, mostly aimed at the header:
  * FIELD: a structural header field (a count, a string or array length, a value type, n_dims, a dimension, a tensor
    type or offset, a scalar value), located by `header_fields`, set to an interesting value (0, 1, 2**31, 2**63,
    2**64-1, the original +-1, ...) cut to the field's width;
  * FLIP: 1..4 random header bytes XORed with random non-zero bytes;
  * WINDOW: 4 or 8 bytes at a random header position overwritten with an interesting value;
  * TRUNCATE: the file cut at a random point (mostly inside the header).

Usage: python experiments/gguf_fuzz.py --n 10000 --seed 0   (writes experiments/results/gguf_fuzz.md)
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import enum
import re
import resource
import signal
import struct
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from lowbit_jax.assets import asset_path
from lowbit_jax.io.gguf import load_gguf
from lowbit_jax.io.loaded import CheckpointError, expected_shapes
from lowbit_jax.qarray import QArray, dequantize

SOURCE = "stories260K_gguf/stories260K.gguf"
RESULTS = Path(__file__).parent / "results" / "gguf_fuzz.md"


# ------------------------------------------------------------------------------------------ the header's layout

class FieldKind(enum.Enum):
  VERSION = "version"
  COUNT = "tensor/metadata count"
  STRING_LENGTH = "string length"
  VALUE_TYPE = "value type"
  ARRAY_LENGTH = "array length"
  SCALAR = "scalar value"
  N_DIMS = "n_dims"
  DIM = "dimension"
  TENSOR_TYPE = "tensor type"
  TENSOR_OFFSET = "tensor offset"


@dataclasses.dataclass(frozen=True)
class Field:
  """A little-endian unsigned field of `size` bytes at `offset`; `label` is its metadata key or tensor name."""
  kind: FieldKind
  offset: int
  size: int
  label: str

  def read(self, data: bytes) -> int:
    return int.from_bytes(data[self.offset:self.offset + self.size], "little")


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9


def header_fields(data: bytes) -> tuple[list[Field], int]:
  """The structural fields of a valid little-endian GGUF v2/v3 file and the header's end; written independently of
  the loader (it trusts the file: use it on the original only)."""
  fields = [Field(FieldKind.VERSION, 4, 4, "version"), Field(FieldKind.COUNT, 8, 8, "tensor count"),
            Field(FieldKind.COUNT, 16, 8, "metadata count")]
  n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
  pos = 24

  def string(label: str) -> str:
    nonlocal pos
    (n,) = struct.unpack_from("<Q", data, pos)
    fields.append(Field(FieldKind.STRING_LENGTH, pos, 8, label))
    pos += 8 + n
    return data[pos - n:pos].decode()

  def value(kind: int, label: str, top: bool) -> None:
    nonlocal pos
    if kind == _STRING:
      string(label)
    elif kind == _ARRAY:
      (item,) = struct.unpack_from("<I", data, pos)
      fields.append(Field(FieldKind.VALUE_TYPE, pos, 4, label))
      (n,) = struct.unpack_from("<Q", data, pos + 4)
      fields.append(Field(FieldKind.ARRAY_LENGTH, pos + 4, 8, label))
      pos += 12
      if item in _SCALAR_SIZES:
        pos += n * _SCALAR_SIZES[item]
      else:
        for _ in range(n):
          value(item, label, top=False)
    else:
      if top:
        fields.append(Field(FieldKind.SCALAR, pos, _SCALAR_SIZES[kind], label))
      pos += _SCALAR_SIZES[kind]

  for _ in range(n_kv):
    key = string("metadata key")
    (kind,) = struct.unpack_from("<I", data, pos)
    fields.append(Field(FieldKind.VALUE_TYPE, pos, 4, key))
    pos += 4
    value(kind, key, top=True)
  for _ in range(n_tensors):
    name = string("tensor name")
    (n_dims,) = struct.unpack_from("<I", data, pos)
    fields.append(Field(FieldKind.N_DIMS, pos, 4, name))
    fields.extend(Field(FieldKind.DIM, pos + 4 + 8 * d, 8, name) for d in range(n_dims))
    pos += 4 + 8 * n_dims
    fields.append(Field(FieldKind.TENSOR_TYPE, pos, 4, name))
    fields.append(Field(FieldKind.TENSOR_OFFSET, pos + 4, 8, name))
    pos += 12
  return fields, pos


# ------------------------------------------------------------------------------------------------- mutations

class Mutation(enum.Enum):
  FIELD = "field set to an interesting value"
  FLIP = "random header bytes flipped"
  WINDOW = "interesting value at a random header position"
  TRUNCATE = "truncated"


@dataclasses.dataclass(frozen=True)
class Mutant:
  mutation: Mutation
  description: str
  data: bytes


def interesting_values(original: int, size: int, rng: np.random.Generator) -> list[int]:
  """Values that break parsers, cut to `size` bytes."""
  values = [0, 1, 2**31, 2**31 - 1, 2**32 - 1, 2**32, 2**63, 2**63 - 1, 2**64 - 1, 2**64 - 32, original + 1,
            original - 1, original * 2, original + 32, 2**(8 * size - 1), int(rng.integers(0, 2**63)) * 2 + 1]
  return [v % 2**(8 * size) for v in values]


def _pick(values: list[int], rng: np.random.Generator) -> int:
  return values[rng.integers(len(values))]


def _patched(data: bytes, offset: int, value: int, size: int) -> bytes:
  return data[:offset] + value.to_bytes(size, "little") + data[offset + size:]


def mutants(data: bytes, n: int, seed: int) -> Iterator[Mutant]:
  """`n` seeded mutants of the GGUF file `data`: 40% FIELD (kind drawn first, then a field of that kind), 20% each
  FLIP, WINDOW and TRUNCATE (cut inside the header 80% of the time)."""
  rng = np.random.default_rng(seed)
  fields, header_end = header_fields(data)
  by_kind = collections.defaultdict(list)
  for f in fields:
    by_kind[f.kind].append(f)
  kinds = sorted(by_kind, key=lambda k: k.value)
  for _ in range(n):
    mutation = list(Mutation)[rng.choice(len(Mutation), p=[0.4, 0.2, 0.2, 0.2])]
    if mutation == Mutation.FIELD:
      group = by_kind[kinds[rng.integers(len(kinds))]]
      f = group[rng.integers(len(group))]
      value = _pick(interesting_values(f.read(data), f.size, rng), rng)
      yield Mutant(mutation, f"{f.kind.value} of {f.label!r} @{f.offset} := {value}",
                   _patched(data, f.offset, value, f.size))
    elif mutation == Mutation.FLIP:
      out = bytearray(data)
      at = rng.integers(0, header_end, size=rng.integers(1, 5))
      for a in at:
        out[a] ^= int(rng.integers(1, 256))
      yield Mutant(mutation, f"bytes {sorted(at.tolist())} flipped", bytes(out))
    elif mutation == Mutation.WINDOW:
      size = int(rng.choice([4, 8]))
      at = int(rng.integers(4, header_end - size))
      value = _pick(interesting_values(0, size, rng), rng)
      yield Mutant(mutation, f"{size} bytes @{at} := {value}", _patched(data, at, value, size))
    else:
      cut = int(rng.integers(0, header_end)) if rng.random() < 0.8 else int(rng.integers(0, len(data)))
      yield Mutant(mutation, f"cut at {cut}", data[:cut])


# ------------------------------------------------------------------------------------------------- outcomes

class Outcome(enum.Enum):
  LOADED = "loaded OK"
  REJECTED = "CheckpointError"
  BAD_LOAD = "loaded, but wrong shapes or non-finite params (bug)"
  OTHER = "other exception (bug)"
  TIMEOUT = "timeout (bug)"


@dataclasses.dataclass(frozen=True)
class Result:
  outcome: Outcome
  detail: str  # the CheckpointError's field (normalised), the other exception, or what was wrong with a load
  seconds: float
  rss_growth: int  # bytes by which the load raised the process's peak RSS (ru_maxrss; 0 below an earlier peak)


class _Timeout(BaseException):
  """Raised by the alarm; a BaseException so that no `except Exception` in the loader swallows it."""


def _on_alarm(signum, frame):
  raise _Timeout


def field_of(error: CheckpointError) -> str:
  """The problem's field and the start of what was expected, names and numbers blanked: "tensor '…': an offset
  aligned to N bytes", "metadata key '…': an array of N STRING elements", ..."""
  text = re.sub(r"\d+", "N", re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", error.problem))
  field, _, expected = text.partition(": ")
  if expected and len(field) < 50:
    return f"{field}: " + " ".join(re.split(r"[(:,]", expected)[0].split()[:6])
  return re.split(r"[(:]", text)[0][:60].strip()


def _flat(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
  out: dict[str, np.ndarray] = {}
  for key, value in params.items():
    out.update(_flat(value, f"{prefix}{key}/") if isinstance(value, dict) else {f"{prefix}{key}": value})
  return out


def load_problem(model) -> str | None:
  """Why a loaded model is wrong (shapes not the config's, non-finite params), or None."""
  flat = _flat(model.params)
  shapes = {k: tuple(v.shape) for k, v in flat.items()}
  if shapes != expected_shapes(model.config):
    return "shapes do not match the config"
  values = (np.asarray(dequantize(v) if isinstance(v, QArray) else v) for v in flat.values())
  if not all(np.all(np.isfinite(v)) for v in values):
    return "non-finite params"
  return None


def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def try_load(path: Path, time_limit: float) -> Result:
  """Loads `path` under an alarm of `time_limit` seconds, watching the peak RSS, and classifies what happened.

  (RSS rather than tracemalloc: it also sees memory maps and untraced buffers, and costs nothing per allocation.)
  """
  previous = signal.signal(signal.SIGALRM, _on_alarm)
  rss_before = _peak_rss()
  start = time.perf_counter()
  signal.setitimer(signal.ITIMER_REAL, time_limit)
  try:
    model = load_gguf(path)
    problem = load_problem(model)
    outcome, detail = (Outcome.LOADED, "") if problem is None else (Outcome.BAD_LOAD, problem)
  except _Timeout:
    outcome, detail = Outcome.TIMEOUT, ""
  except CheckpointError as e:
    outcome, detail = ((Outcome.REJECTED, field_of(e)) if str(path) in str(e)
                       else (Outcome.OTHER, f"CheckpointError without the path: {e}"))
  except Exception as e:  # noqa: BLE001 -- any other exception is the bug this looks for
    outcome, detail = Outcome.OTHER, f"{type(e).__name__}: {e}"[:200]
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    seconds = time.perf_counter() - start
    signal.signal(signal.SIGALRM, previous)
  return Result(outcome, detail, seconds, _peak_rss() - rss_before)


# ------------------------------------------------------------------------------------------------- the run

@dataclasses.dataclass(frozen=True)
class Trial:
  """A mutant, less its bytes (keeping 10,000 copies of the file would cost 12 GB), and what loading it did."""
  mutation: Mutation
  description: str
  result: Result


def run(n: int, seed: int, time_limit: float, show_progress: bool) -> list[Trial]:
  """Writes each mutant to its own file (a file still memory-mapped is never overwritten) and tries to load it."""
  import tqdm  # only the command line needs it

  data = asset_path(SOURCE).read_bytes()
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, mutant in enumerate(tqdm.tqdm(mutants(data, n, seed), total=n, disable=not show_progress)):
      path = Path(tmp) / f"mutant_{i}.gguf"
      path.write_bytes(mutant.data)
      result = try_load(path, time_limit)
      results.append(Trial(mutant.mutation, mutant.description, result))
      path.unlink()
  return results


def table(trials: list[Trial], n: int, seed: int, time_limit: float, wall: float) -> str:
  """The markdown report: outcome counts, CheckpointError fields, bugs in full, the slowest and largest loads."""
  outcomes = collections.Counter(t.result.outcome for t in trials)
  fields = collections.Counter(t.result.detail for t in trials if t.result.outcome == Outcome.REJECTED)
  by_mutation = collections.Counter((t.mutation, t.result.outcome) for t in trials)
  slowest = max(trials, key=lambda t: t.result.seconds)
  largest = max(trials, key=lambda t: t.result.rss_growth)
  rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  lines = [f"# GGUF loader fuzz: {n} mutants of {SOURCE} (seed {seed})", "",
           f"`python experiments/gguf_fuzz.py --n {n} --seed {seed}`; per-mutant time limit {time_limit:g} s; "
           f"{wall:.0f} s in all.", "", "| outcome | mutants |", "|---|---:|"]
  lines += [f"| {o.value} | {outcomes[o]} |" for o in Outcome]
  lines += ["", "| mutation | " + " | ".join(o.value for o in Outcome) + " |", "|---" + "|---:" * len(Outcome) + "|"]
  lines += [f"| {m.value} | " + " | ".join(str(by_mutation[m, o]) for o in Outcome) + " |" for m in Mutation]
  lines += ["", "CheckpointError by field (names and numbers blanked):", "", "| field | mutants |", "|---|---:|"]
  lines += [f"| `{f}` | {c} |" for f, c in fields.most_common()]
  lines += ["", f"Max time per mutant: {slowest.result.seconds:.3f} s ({slowest.description}: "
                f"{slowest.result.outcome.value}).",
            f"Max growth of the peak RSS by one mutant: {largest.result.rss_growth / 1e6:.1f} MB "
            f"({largest.description}: {largest.result.outcome.value}).",
            f"Peak RSS of the whole run (Python, numpy, the loader and JAX imported): {rss_mb:.0f} MB."]
  bugs = [t for t in trials if t.result.outcome in (Outcome.OTHER, Outcome.TIMEOUT, Outcome.BAD_LOAD)]
  if bugs:
    lines += ["", "Bugs:", ""] + [f"- {t.description}: {t.result.outcome.value} {t.result.detail}" for t in bugs[:50]]
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=10_000, help="number of mutants")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--time-limit", type=float, default=10.0, help="seconds per mutant before it counts as a hang")
  parser.add_argument("--out", type=Path, default=RESULTS)
  args = parser.parse_args()
  start = time.perf_counter()
  results = run(args.n, args.seed, args.time_limit, show_progress=True)
  report = table(results, args.n, args.seed, args.time_limit, time.perf_counter() - start)
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(report)
  print(report)


if __name__ == "__main__":
  main()
