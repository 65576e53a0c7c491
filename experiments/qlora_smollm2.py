"""QLoRA on the real SmolLM2-135M-Instruct, with the training step's measured peak memory against LoRA on the float
model (GitHub issue 13, item 5, the SmolLM2 part).

    python -m experiments.qlora_smollm2            # ~15 min on 2 cores -> experiments/results/qlora_smollm2.md, .png
    python -m experiments.qlora_smollm2 --quick    # 2 steps each, short windows: a smoke test (to the temp dir)

Each mode runs in its own fresh Python process (`--mode`), so that one mode's buffers never count in the other's peak:

  * `qlora`: the block linears (7 per layer x 30 layers) as NF4 + double quantization (`lb.rtn(..., nf4_spec())`),
    never decoded to float, plus rank-`RANK` adapters on each (`lb.lora`); embedding (tied head) and norms float32.
  * `lora-float`: the same adapters (same init) on the float32 model, the update applied as ``W + (alpha/r) A B``
    (`lb.merge` inside the step: what a plain LoRA implementation does).

Protocol (fixed seeds, every number from this script):
  * Model: SmolLM2-135M-Instruct's Q4_1 weights dequantized to float32 (`experiments/ptq_table.py load`, layers
    scanned): the "float model". The NF4 base is made from it.
  * Data: the first `TRAIN_CHARS` characters of the TinyStories training slice and of TinyStories val (one BOS per
    story), tokenized by the GGUF's BPE; `steps` training batches of `BATCH` random windows of `SEQ + 1` tokens
    (seed 1); validation: `VAL_WINDOWS` random windows of `SEQ + 1` tokens of val (seed 7), mean next-token loss.
  * Optimizer: optax adamw (peak lr `LR`, warmup-cosine, no weight decay) over the adapters only, the whole step
    (forward, backward through the packed matmul's custom_vjp, update) under one `jit`.
  * Memory, per mode: bytes of the frozen weights, adapters and optimizer state (`lb.memory_report`); XLA's
    compiled memory analysis of the step (arguments + temporaries); and the process's measured peak RSS during the
    training steps: after setup (load, quantize; the `qlora` process drops its float weights) freed heap memory
    is returned to the OS (`malloc_trim`) and the kernel's high-water mark (VmHWM) is reset
    (`/proc/self/clear_refs`), so the peak counts the resident state plus the step's working memory, not the
    loading of the GGUF; beside it the RSS just before the first step, and the growth from one to the other.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import enum
import gc
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import lowbit_jax as lb
from experiments import ptq_table as pt
from experiments import smollm2_table as st
from lowbit_jax import eval as ev
from lowbit_jax.assets import asset_path
from lowbit_jax.eval import Segmentation

RANK, ALPHA = 8, 16.0
BATCH, SEQ = 4, 128
STEPS, LR, WARMUP = 40, 1e-3, 4
VAL_WINDOWS = 16
TRAIN_CHARS = 400_000
TRAIN_ASSET = "tinystories/tinystories_train_first2MiB.txt"
VAL_ASSET = "tinystories/tinystories_val_part1.txt"
OUT = Path(__file__).resolve().parent / "results" / "qlora_smollm2"


class Mode(enum.Enum):
  QLORA = "qlora"
  LORA_FLOAT = "lora-float"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
  steps: int = STEPS
  val_windows: int = VAL_WINDOWS
  seq: int = SEQ


QUICK = Run(steps=2, val_windows=2, seq=64)


def _rss_mib(field: str) -> float:
  """VmRSS / VmHWM of this process from /proc/self/status, MiB."""
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1]) / 1024
  raise RuntimeError(f"/proc/self/status has no {field}")


def _release_and_reset_peak() -> None:
  """Return freed heap memory to the OS (glibc `malloc_trim`: the setup's dropped buffers would otherwise stay
  resident), then reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux: 5 into clear_refs)."""
  gc.collect()
  ctypes.CDLL("libc.so.6").malloc_trim(0)
  Path("/proc/self/clear_refs").write_text("5")


def _windows(tokenizer, asset: str, n: int, length: int, seed: int) -> jax.Array:
  text = asset_path(asset).read_text(encoding="utf-8")[:TRAIN_CHARS]
  stream = ev.token_stream(text, tokenizer, Segmentation.BOS_PER_BLOCK)
  return jnp.stack(ev.sample_windows(stream, n=n, length=length, batch=1, seed=seed))[:, 0]   # (n, length)


def _xent(logits, tokens):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:]))


def _mib(tree) -> float:
  return lb.memory_report(tree).total_bytes / 2**20 if jax.tree.leaves(tree) else 0.0


def child(mode: Mode, run: Run) -> dict:
  """One mode's training run in this process -> its numbers (see the module docstring)."""
  t0, baseline = time.perf_counter(), _rss_mib("VmRSS")     # Python, JAX and the imports, before any model
  setup = pt.load(st.CONFIG)
  x0 = jnp.zeros((1, run.seq), jnp.int32)
  an = lb.analyze(setup.apply, setup.params, x0)
  base = lb.rtn(setup.params, an, lb.nf4_spec())
  qlora = lb.lora(setup.apply, lb.LoraOptions(rank=RANK, alpha=ALPHA))
  adapters = qlora.init(jax.random.key(0), base, an)
  train = _windows(setup.tokenizer, TRAIN_ASSET, run.steps * BATCH, run.seq + 1, 1).reshape(
      run.steps, BATCH, run.seq + 1)                                              # (steps, batch, seq + 1)
  val = _windows(setup.tokenizer, VAL_ASSET, run.val_windows, run.seq + 1, 7)    # (windows, seq + 1)
  if mode is Mode.QLORA:
    frozen = base
    forward = lambda fr, ad, t: qlora(fr, ad, t, train=False)
  else:
    frozen, apply = setup.params, setup.apply
    forward = lambda fr, ad, t: apply(lb.merge(fr, ad), t)
  del setup, base, an   # the Analysis keeps the float leaves it traced
  gc.collect()
  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, LR, min(WARMUP, run.steps // 2), run.steps, LR * 0.1),
                    weight_decay=0.0)
  with jax.numpy_dtype_promotion("standard"):
    opt_state = opt.init(adapters)

  def loss(ad, fr, t):
    return _xent(forward(fr, ad, t[:, :-1]), t)

  @jax.jit
  def step(ad, o, fr, t):
    val_, g = jax.value_and_grad(loss)(ad, fr, t)
    with jax.numpy_dtype_promotion("standard"):
      u, o = opt.update(g, o, ad)
      return optax.apply_updates(ad, u), o, val_

  val_loss = jax.jit(lambda ad, fr, v: jnp.mean(jax.vmap(lambda w: loss(ad, fr, w[None]))(v)))
  compiled = step.lower(adapters, opt_state, frozen, train[0]).compile()
  mem = compiled.memory_analysis()
  xla_mib = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**20 if mem is not None else math.nan
  before = float(val_loss(adapters, frozen, val))
  _release_and_reset_peak()
  rss_before = _rss_mib("VmRSS")
  losses, t_train = [], time.perf_counter()
  for i in tqdm(range(run.steps), desc=mode.value):
    adapters, opt_state, l = compiled(adapters, opt_state, frozen, train[i])
    losses.append(float(l))
  t_train = time.perf_counter() - t_train
  peak = _rss_mib("VmHWM")
  after = float(val_loss(adapters, frozen, val))
  return dict(mode=mode.value, frozen_mib=_mib(frozen), adapters_mib=_mib(adapters), opt_mib=_mib(opt_state),
              adapter_params=int(sum(x.size for x in jax.tree.leaves(adapters))), xla_step_mib=xla_mib,
              baseline_mib=baseline, rss_before_mib=rss_before, peak_rss_mib=peak, rss_growth_mib=peak - rss_before, val_before=before, val_after=after, losses=losses,
              train_seconds=t_train, seconds=time.perf_counter() - t0)


def main(run: Run, out: Path) -> None:
  results = {}
  out.parent.mkdir(parents=True, exist_ok=True)
  for mode in Mode:
    path = out.parent / f"{out.name}_{mode.value}.json"
    args = [sys.executable, "-m", "experiments.qlora_smollm2", "--mode", mode.value, "--json", str(path)]
    subprocess.run(args + (["--quick"] if run == QUICK else []), check=True, cwd=Path(__file__).resolve().parents[1])
    results[mode] = json.loads(path.read_text())
    path.unlink()
  write(run, results, out)


def write(run: Run, results: dict, out: Path) -> None:
  q, f = results[Mode.QLORA], results[Mode.LORA_FLOAT]
  lines = [
      "# QLoRA on SmolLM2-135M-Instruct: loss and measured memory against LoRA on the float model", "",
      f"Written by `python -m experiments.qlora_smollm2` on {datetime.date.today()}, jax {jax.__version__} on "
      f"{jax.default_backend()} (2 cores); {(q['seconds'] + f['seconds']) / 60:.1f} min. Rank {RANK}, alpha {ALPHA}, "
      f"adapters on the 210 block linears ({q['adapter_params']:,} parameters), {run.steps} adamw steps of "
      f"{BATCH} x {run.seq} TinyStories training tokens (peak lr {LR}); validation loss: {run.val_windows} windows of "
      f"{run.seq} TinyStories val tokens. Each mode ran in its own process (the script's docstring has the protocol).",
      "", "| | QLoRA (NF4 + DQ base) | LoRA on the float32 model | ratio |", "| --- | --- | --- | --- |"]
  rows = [("frozen weights (MiB)", "frozen_mib"), ("adapters (MiB)", "adapters_mib"),
          ("optimizer state (MiB)", "opt_mib"), ("XLA step: arguments + temporaries (MiB)", "xla_step_mib"),
          ("RSS after the imports, before loading (MiB)", "baseline_mib"),
          ("RSS before the first step (MiB)", "rss_before_mib"), ("peak RSS while training (MiB)", "peak_rss_mib"),
          ("peak RSS growth while training (MiB)", "rss_growth_mib")]
  for label, key in rows:
    lines.append(f"| {label} | {q[key]:.1f} | {f[key]:.1f} | {q[key] / f[key]:.3f} |")
  lines += [f"| validation loss before -> after (nats) | {q['val_before']:.4f} -> {q['val_after']:.4f} | "
            f"{f['val_before']:.4f} -> {f['val_after']:.4f} | |",
            f"| training time, {run.steps} steps (s) | {q['train_seconds']:.1f} | {f['train_seconds']:.1f} | "
            f"{q['train_seconds'] / f['train_seconds']:.2f} |", "",
            "Frozen weights: the whole model's parameters as held (QLoRA: NF4 codes + double-quantized scales of "
            "the block linears, the float32 embedding/head and norms). Peak RSS is the whole process (Python, JAX, "
            "the tokenizer and data included), so the difference between the columns is what the packed base saves; "
            f"QLoRA lowered the validation loss by {q['val_before'] - q['val_after']:.4f} nats from its NF4 start.", ""]
  out.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
  plot(results, out.with_suffix(".png"))
  print("\n".join(lines))


def plot(results: dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
  for mode, r in results.items():
    a.plot(r["losses"], label=f"{mode.value} (val {r['val_before']:.3f} -> {r['val_after']:.3f})")
  a.set_xlabel("step")
  a.set_ylabel("train loss (nats)")
  a.legend()
  keys = (("frozen weights", "frozen_mib"), ("XLA step", "xla_step_mib"), ("peak RSS", "peak_rss_mib"))
  x = np.arange(len(keys))
  for i, (mode, r) in enumerate(results.items()):
    b.bar(x + 0.4 * i, [r[k] for _, k in keys], 0.4, label=mode.value)
  b.set_xticks(x + 0.2, [k for k, _ in keys])
  b.set_ylabel("MiB")
  b.legend()
  fig.suptitle("SmolLM2-135M: QLoRA (NF4 base) vs LoRA on float32")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="2 steps, short windows (a smoke test)")
  ap.add_argument("--mode", choices=[m.value for m in Mode], help="internal: run one mode in this process")
  ap.add_argument("--json", type=Path, help="internal: where --mode writes its numbers")
  a = ap.parse_args()
  r = QUICK if a.quick else Run()
  if a.mode:
    a.json.write_text(json.dumps(child(Mode(a.mode), r)))
  else:
    main(r, Path(tempfile.gettempdir()) / (OUT.name + "_quick") if a.quick else OUT)
