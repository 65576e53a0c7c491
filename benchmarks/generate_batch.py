"""Batched greedy chat generation on the real SmolLM2-135M-Instruct (30 layers, GGUF Q4_1 dequantized to float32).

    python benchmarks/generate_batch.py [--prompts 32] [--new-tokens 32] [--single 4]

Frozen protocol: `--prompts` user questions (the list below, cycled) rendered with the GGUF's chat template and
tokenized; `generate_greedy_batch` over all of them at once, `--new-tokens` new tokens each (no stop token, so every
row runs every step), in both layer layouts (unrolled `layers_i`, `nn.scan`). The first call (tracing, compilation
and the run) and the mean of two further calls (the run alone) are reported separately, with new tokens per second.
For comparison, batch-1 `generate_greedy` on the first `--single` prompts (each timed after a warm-up call at its
prompt length) gives the per-prompt time that running the prompts one at a time would cost.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import jax
import numpy as np

import lowbit_jax as lb
from lowbit_jax import assets
from lowbit_jax.eval import generate_greedy, generate_greedy_batch
from lowbit_jax.io.gguf import load_gguf
from lowbit_jax.models import llama

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "experiments"))
from chat_prompts import QUESTIONS  # noqa: E402


def _seconds(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--prompts", type=int, default=32)
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--single", type=int, default=4)
  args = ap.parse_args()
  m = load_gguf(assets.asset_path("smollm2_135m_instruct_q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"))
  questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.prompts)]
  prompts = [m.tokenizer.encode(m.chat_template.apply_chat_template([{"role": "user", "content": q}]))
             for q in questions]
  lengths = [len(p) for p in prompts]
  print(f"SmolLM2-135M-Instruct, {args.prompts} chat prompts of {min(lengths)}-{max(lengths)} tokens, "
        f"{args.new_tokens} new tokens each, on {jax.devices()[0].platform} ({os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at start)")
  print(f"{'layout':<10} {'first call s':>13} {'run s':>8} {'new tok/s':>10} {'batch-1 run s/prompt':>21}")
  outputs = {}
  for scan in (False, True):
    model = llama.Llama(m.config, scan_layers=scan)
    floats = lb.dequantize(m.params)   # the float view of the Q4_1 / Q8_0 QArrays
    params = jax.device_put(llama.stack_layers(floats, m.config.n_layers) if scan else floats)
    run = lambda: outputs.__setitem__(scan, generate_greedy_batch(model, params, prompts,  # noqa: E731
                                                                  max_new_tokens=args.new_tokens))
    first = _seconds(run)
    steady = (_seconds(run) + _seconds(run)) / 2
    single = []
    for p in prompts[:args.single]:
      one = lambda p=p: generate_greedy(model, params, p, max_new_tokens=args.new_tokens)  # noqa: E731
      one()  # compile for this prompt length
      single.append(_seconds(one))
    print(f"{'scan' if scan else 'unrolled':<10} {first:>13.1f} {steady:>8.1f} "
          f"{args.prompts * args.new_tokens / steady:>10.1f} {np.mean(single):>21.2f}")
  same = all(np.array_equal(a, b) for a, b in zip(outputs[False], outputs[True]))
  print(f"layouts agree token for token: {same}")
  for q, out in list(zip(questions, outputs[False]))[:4]:
    print(f"  {q!r} -> {m.tokenizer.decode(out)!r}")


if __name__ == "__main__":
  main()
