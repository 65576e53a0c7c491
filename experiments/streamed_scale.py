"""Streamed GPTQ at billion-parameter scale on this 24 GB / 2-core machine (GitHub issue 15, item 4).

    python experiments/streamed_scale.py                       # both models (~30 min)
    python experiments/streamed_scale.py --model tinyllama-1.1b
    python experiments/streamed_scale.py --model smollm2 --seq-len 128 --n-seqs 8   # a quicker run

Writes experiments/results/streamed_scale.md (one section per model; a rerun of one model keeps the other's).

Models (layers scanned, `lowbit_jax.models.llama`):
  * tinyllama-1.1b: TinyLlama-1.1B's shape (22 layers, dim 2048, FFN 5632, 32 query / 4 key-value heads, vocab
    32000, untied head: 1.10B parameters) with RANDOM weights (normal, std 0.02; norms 1): no checkpoint can be
    downloaded here. Its calibration batches are random token ids, so its outputs mean nothing; what it measures
    is time and memory at this scale.
  * smollm2: the real SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32), calibrated on WikiText-2
    validation windows, with its perplexity on the first 8 windows of 512 tokens of WikiText-2 test.

Protocol: `lb.streamed(lb.gptq, ...)` with int4 groups of 128 (act-order, static groups: the library's default) on
`n_seqs` sequences of `seq_len` tokens in batches of 4; every linear weight of the blocks and the head is
quantized; the token embedding too for the random model (round-to-nearest: no statistics reach a lookup; its
lookups decode only the rows they take), while SmolLM2's tied embedding stays float32. Reported from the quantizing process: wall time per layer (between
the ends of consecutive layers' last blocks) and in total, the RSS after building the float model and the peak RSS
(VmHWM) at the end of the streamed quantization (the float model included). The packed parameters are then saved with `lb.checkpoint.save`, and a *fresh process*
measures the forward pass: its RSS after importing jax and lowbit_jax and running one tiny jitted op (the
baseline), then `lb.checkpoint.restore`, a jitted `lb.quantized(apply)` forward of one batch (compilation
included), and its peak RSS (VmHWM) minus the baseline: what holding and running the 4-bit model costs. Its logits
are compared with the quantizing process's float forward of the dequantized parameters on the same tokens.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "streamed_scale.md"
SPEC_NAME = "int4 g128"


class Model(enum.Enum):
  TINYLLAMA = "tinyllama-1.1b"
  SMOLLM2 = "smollm2"


TITLES = {Model.TINYLLAMA: "TinyLlama-1.1B shape, RANDOM weights", Model.SMOLLM2: "SmolLM2-135M-Instruct (real weights)"}


def rss_mib(field: str = "VmRSS") -> float:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1]) / 1024
  raise RuntimeError(f"/proc/self/status has no {field}")


def _tinyllama():
  import jax.numpy as jnp
  from lowbit_jax.models.llama import Llama, LlamaConfig
  cfg = LlamaConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, hidden_dim=5632,
                    max_seq_len=2048)
  model = Llama(cfg, scan_layers=True)
  import jax
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  rng = np.random.default_rng(0)

  def leaf(path, s):
    if "norm" in jax.tree_util.keystr(path):
      return jnp.ones(s.shape, jnp.float32)
    return jnp.asarray(rng.standard_normal(s.shape, dtype=np.float32) * np.float32(0.02))
  params = jax.tree_util.tree_map_with_path(leaf, shapes)
  return model, params, None, cfg


def _smollm2():
  import lowbit_jax as lb
  from lowbit_jax.assets import asset_path
  from lowbit_jax.io.gguf import load_gguf
  from lowbit_jax.models.llama import Llama, stack_layers
  loaded = load_gguf(asset_path("smollm2_135m_instruct_q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"))
  params = stack_layers(lb.dequantize(loaded.params), loaded.config.n_layers)
  return Llama(loaded.config, scan_layers=True), params, loaded.tokenizer, loaded.config


def _tokens(model: Model, tokenizer, cfg, n: int, length: int, seed: int, asset: str):
  """(n, length) int32: random ids for the random model, windows of `asset` for the real one."""
  if model is Model.TINYLLAMA:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (n, length), dtype=np.int32)
  from lowbit_jax import eval as ev
  from lowbit_jax.assets import asset_path
  from lowbit_jax.eval import Segmentation
  stream = ev.token_stream(asset_path(asset).read_text(encoding="utf-8"), tokenizer, Segmentation.ONE_DOCUMENT)
  if seed < 0:   # evaluation: the first n windows
    return stream[:n * length].reshape(n, length).astype(np.int32)
  return np.stack([np.asarray(w)[0] for w in ev.sample_windows(stream, n=n, length=length, batch=1, seed=seed)])


def quantize(model: Model, n_seqs: int, seq_len: int, work: Path) -> dict:
  import jax
  import jax.numpy as jnp
  import lowbit_jax as lb
  t0 = time.perf_counter()
  net, params, tokenizer, cfg = _tinyllama() if model is Model.TINYLLAMA else _smollm2()
  apply = lambda p, t: net.apply({"params": p}, t)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  calib = _tokens(model, tokenizer, cfg, n_seqs, seq_len, 0, "wikitext2_raw/wiki.valid.raw")
  batches = [jnp.asarray(calib[i:i + 4]) for i in range(0, n_seqs, 4)]
  setup_s, rss_float = time.perf_counter() - t0, rss_mib()
  ends: list[float] = []

  def gptq(p, c, spec):
    out = lb.gptq(p, c, spec)
    jax.block_until_ready(out)
    ends.append(time.perf_counter())
    return out
  t0 = time.perf_counter()
  # The random model stores everything at 4 bits, its token embedding included (no statistics reach a lookup
  # table: round-to-nearest, with the library's warning); SmolLM2 keeps its tied embedding float (the default).
  where = r"(kernel|embedding)$" if model is Model.TINYLLAMA else None
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "gptq: no calibration statistics for .*tok_embeddings", RuntimeWarning)
    qparams = lb.streamed(gptq, apply, params, batches, lb.int_spec(4, group_size=128), where=where)
  total_s = time.perf_counter() - t0
  peak_quant = rss_mib("VmHWM")
  first = 1 if where is not None else 0   # the embedding's block comes first
  layer_ends = [ends[first - 1] if first else t0] + ends[first + 3:first + 4 * cfg.n_layers:4]   # 4 blocks a layer
  per_layer = np.diff(layer_ends)
  test = _tokens(model, tokenizer, cfg, 1, 128, 1, "wikitext2_raw/wiki.test.raw")
  ref = np.asarray(jax.jit(apply)(lb.dequantize(qparams), jnp.asarray(test)))
  lb.checkpoint.save(work / "qparams", qparams)
  np.save(work / "test.npy", test)
  (work / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
  if model is Model.SMOLLM2:
    np.save(work / "eval.npy", _tokens(model, tokenizer, cfg, 8, 512, -1, "wikitext2_raw/wiki.test.raw"))
  np.save(work / "ref.npy", ref)
  rep = lb.memory_report(qparams)
  return dict(params=int(n_params), setup_s=setup_s, rss_float_mib=rss_float, total_s=total_s,
              layer_s_median=float(np.median(per_layer)), layer_s_max=float(np.max(per_layer)),
              n_layers=cfg.n_layers, peak_quant_mib=peak_quant, embedding="int4 g128 (RTN)" if where else "float32", stored_mib=rep.total_bytes / 2**20,
              float_mib=4 * n_params / 2**20, bits_per_weight=rep.bits_per_weight, n_seqs=n_seqs, seq_len=seq_len)


def forward(model: Model, work: Path) -> dict:
  """Run in a fresh process: baseline, restore, packed forward, peak RSS."""
  import jax
  import jax.numpy as jnp
  import lowbit_jax as lb
  jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.ones(4)))
  base = rss_mib()
  from lowbit_jax.models.llama import Llama, LlamaConfig
  net = Llama(LlamaConfig(**json.loads((work / "config.json").read_text())), scan_layers=True)
  apply = lambda p, t: net.apply({"params": p}, t)
  qparams = lb.checkpoint.restore(work / "qparams")
  loaded = rss_mib()
  fn = jax.jit(lb.quantized(apply))
  test = np.load(work / "test.npy")
  logits = np.asarray(fn(qparams, jnp.asarray(test)))
  peak = rss_mib("VmHWM")
  ref = np.load(work / "ref.npy")
  out = dict(baseline_mib=base, loaded_mib=loaded - base, forward_peak_mib=peak - base,
             max_logit_diff=float(np.max(np.abs(logits - ref))), logit_scale=float(np.max(np.abs(ref))))
  if model is Model.SMOLLM2:
    windows = np.load(work / "eval.npy")   # tokenized by the quantizing process (no tokenizer loaded here)
    nll = 0.0
    for w in windows:
      lg = fn(qparams, jnp.asarray(w[None]))[0, :-1]
      nll += float(jnp.sum(jax.nn.logsumexp(lg, -1) - jnp.take_along_axis(lg, jnp.asarray(w[1:, None]), -1)[:, 0]))
    out["ppl_wikitext2"] = float(np.exp(nll / (8 * 511)))
  return out


def markdown_section(model: Model, q: dict, f: dict) -> str:
  real = model is Model.SMOLLM2
  lines = [f"## {TITLES[model]}", "",
           f"{q['params'] / 1e9:.3f}B parameters; streamed GPTQ {SPEC_NAME} on {q['n_seqs']} x {q['seq_len']} "
           f"tokens; {datetime.date.today().isoformat()}.", "",
           "| measurement | value |", "| --- | ---: |",
           f"| float32 model built (RSS after setup) | {q['rss_float_mib']:.0f} MiB |",
           f"| streamed GPTQ, total wall time | {q['total_s'] / 60:.1f} min |",
           f"| per layer: median / max | {q['layer_s_median']:.1f} s / {q['layer_s_max']:.1f} s |",
           f"| peak RSS of the quantizing process (float model included) | {q['peak_quant_mib']:.0f} MiB |",
           f"| token embedding | {q['embedding']} |",
           f"| packed parameters (memory_report: codes, scales, embedding, float norms) | "
           f"{q['stored_mib']:.0f} MiB ({q['bits_per_weight']:.2f} bits/weight; float32: {q['float_mib']:.0f} MiB) |",
           f"| fresh process: Python + JAX baseline RSS | {f['baseline_mib']:.0f} MiB |",
           f"| fresh process: RSS of the restored packed parameters (above baseline) | {f['loaded_mib']:.0f} MiB |",
           f"| **fresh process: peak RSS of the packed forward (above baseline)** | **{f['forward_peak_mib']:.0f} MiB** |",
           f"| packed forward vs float forward of the dequantized weights: max logit difference | "
           f"{f['max_logit_diff']:.2e} (logits up to {f['logit_scale']:.1f}) |"]
  if real:
    lines.append(f"| perplexity, WikiText-2 test (8 x 512 tokens) | {f['ppl_wikitext2']:.3f} |")
  return "\n".join(lines) + "\n"


def main(models, n_seqs: int, seq_len: int) -> None:
  sections = {}
  if OUT.exists():
    for part in OUT.read_text(encoding="utf-8").split("\n## ")[1:]:
      for key, title in TITLES.items():
        if part.startswith(title):
          sections[key] = "## " + part.rstrip() + "\n"
  if len(models) > 1:   # one process per model: a process's peak RSS (VmHWM) would carry over to the next model
    for model in models:
      subprocess.run([sys.executable, __file__, "--model", model.value, "--n-seqs", str(n_seqs), "--seq-len",
                      str(seq_len)], check=True)
    return
  for model in models:
    with tempfile.TemporaryDirectory() as tmp:
      work = Path(tmp)
      q = quantize(model, n_seqs, seq_len, work)
      print(json.dumps(q, indent=1), flush=True)
      done = subprocess.run([sys.executable, __file__, "--forward", model.value, str(work)], check=True,
                            capture_output=True, text=True)
      f = json.loads(done.stdout.strip().splitlines()[-1])
      print(json.dumps(f, indent=1), flush=True)
    sections[model] = markdown_section(model, q, f)
  head = ("# Streamed GPTQ at scale\n\nWritten by `experiments/streamed_scale.py`, jax on the 2-core CPU. The "
          "protocol is at the end.\n\n")
  body = "\n".join(sections[m] for m in Model if m in sections)
  OUT.write_text(head + body + "\n## Protocol (the script's docstring)\n\n" + __doc__.split("Protocol: ", 1)[1],
                 encoding="utf-8")
  print(OUT.read_text(encoding="utf-8"))
  print(f"wrote {OUT}")


if __name__ == "__main__":
  if len(sys.argv) == 4 and sys.argv[1] == "--forward":
    print(json.dumps(forward(Model(sys.argv[2]), Path(sys.argv[3]))))
    sys.exit(0)
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", type=Model, choices=list(Model), default=None, help="default: both")
  ap.add_argument("--n-seqs", type=int, default=32)
  ap.add_argument("--seq-len", type=int, default=256)
  args = ap.parse_args()
  try:
    from experiments import compile_cache
  except ModuleNotFoundError:
    import compile_cache
  compile_cache.enable()
  main([args.model] if args.model else list(Model), args.n_seqs, args.seq_len)
