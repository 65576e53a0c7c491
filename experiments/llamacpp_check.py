"""Does llama.cpp run what `export_gguf` writes, and compute what we compute? (GitHub issue 11, part 5.)

NEEDS A SEPARATE INSTALL of llama-cpp-python (it compiles llama.cpp from source; it is not a dependency of this
project and must not become one):

    python -m venv /tmp/llamacpp && /tmp/llamacpp/bin/pip install llama-cpp-python numpy
    python -m experiments.llamacpp_check [--llamacpp-python /tmp/llamacpp/bin/python]

This script runs in the project's environment: it exports stories260K as GGUF files (F32, F16, Q8_0, Q4_0 and
Q4_1 from the float model; Q4_0 from RTN and from GPTQ QArrays, written as their own blocks) and SmolLM2-135M-Instruct
(F32, and RTN QArrays as Q8_0, with its BPE tokenizer and chat template), and computes our logits for a prompt
with each file as `load_gguf` reads it. For each file it then starts the llama.cpp venv's Python
on `_LLAMACPP_SIDE` (below), which loads the file with `llama_cpp.Llama`, tokenizes the prompt with llama.cpp's own
tokenizer and evaluates it with `logits_all=True` and a float32 KV cache (llama.cpp's default float16 cache alone
moves the F32 file's logits by up to 1.3e-2; with float32, by 1.2e-5). Compared per file: the token ids (ours vs
llama.cpp's), the logits at every position (max |difference|, relative to the logits' standard deviation), top-1
agreement and KL(ours || llama.cpp). Writes experiments/results/llamacpp_check.md.

What to expect: the same weights in both, so F32 differs by float summation order only; for the block types,
llama.cpp's CPU backend also quantizes the activations to Q8_0 / Q8_1 blocks before each quantized matmul (its
vec_dot kernels), which we do not, so those differ by more.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import tempfile
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import lowbit_jax as lb
from lowbit_jax import export as ex
from lowbit_jax.assets import asset_path
from lowbit_jax.eval import kl_divergence, top1_agreement
from lowbit_jax.io.gguf import load_gguf
from lowbit_jax.io.gguf_export import export_gguf
from lowbit_jax.io.gguf_types import ExportType
from lowbit_jax.models.llama import Llama

STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
RESULTS = Path(__file__).resolve().parent / "results" / "llamacpp_check.md"

_LLAMACPP_SIDE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from llama_cpp import Llama, __version__
    model, prompt, out = sys.argv[1], sys.argv[2], sys.argv[3]
    # KV cache in F32 (type 0; llama.cpp's default F16 cache alone moves F32 logits by ~1e-2)
    llm = Llama(model_path=model, n_ctx=512, logits_all=True, verbose=False, n_threads=2, seed=0, type_k=0,
                type_v=0, flash_attn=False)
    # BOS when the vocabulary asks for it (add_bos_token); special tokens (<|im_start|>) parsed as such
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    llm.eval(ids)
    np.save(out, np.asarray(llm.scores[:len(ids)], np.float32))
    print(json.dumps({"ids": ids, "version": __version__}))
""")


@dataclasses.dataclass(frozen=True)
class Check:
  label: str
  path: Path
  size: int
  n_tokens: int
  same_ids: bool
  max_abs: float
  rel: float
  top1: float
  kl: float


def stories_files(out_dir: Path, calib_windows: int) -> list[tuple[str, Path]]:
  """The stories260K files to check, as (label, path)."""
  model = load_gguf(asset_path("stories260K_gguf/stories260K.gguf"))
  files = []
  for t in (ExportType.F32, ExportType.F16, ExportType.Q8_0, ExportType.Q4_0, ExportType.Q4_1):
    path = out_dir / f"stories260K.float.{t.value}.gguf"
    export_gguf(path, model.config, model.params, model.tokenizer, tensor_type=t)
    files.append((f"stories260K float -> {t.value}", path))
  text = asset_path("tinystories/tinystories_train_first2MiB.txt").read_text(encoding="utf-8")[:ex.Calib.max_chars]
  stream = ex.token_stream(text, model.tokenizer, ex.Segmentation.BOS_PER_BLOCK)
  batches = ex.calibration_batches(stream, ex.Calib(windows=calib_windows))
  for method in (ex.Method.RTN, ex.Method.GPTQ):
    params = ex.quantize_for(model, method, ExportType.Q4_0, batches)
    path = out_dir / f"stories260K.{method.value}.Q4_0.gguf"
    export_gguf(path, model.config, params, model.tokenizer, tensor_type=ExportType.Q4_0)
    files.append((f"stories260K {method.value} QArrays -> Q4_0", path))
  return files


def smollm2_files(out_dir: Path) -> list[tuple[str, Path]]:
  """SmolLM2-135M-Instruct (its Q4_1 file's values) as F32, and RTN QArrays as Q8_0, with its chat template; and,
  as a control, the Q8_0 file's decoded values written as F32 (the same weights without llama.cpp's quantized
  matmuls)."""
  files = []
  for t in (ExportType.F32, ExportType.Q8_0):
    path = out_dir / f"smollm2.{t.value}.gguf"
    ex.run("smollm2", ex.Method.RTN, t, path)
    files.append((f"SmolLM2 rtn -> {t.value}", path))
  q8 = load_gguf(path)
  control = out_dir / "smollm2.Q8_0-values.F32.gguf"
  export_gguf(control, q8.config, lb.dequantize(q8.params), q8.tokenizer, tensor_type=ExportType.F32,
              chat_template=q8.chat_template)
  files.append(("SmolLM2 rtn -> Q8_0, decoded, as F32 (control)", control))
  return files


def check(label: str, path: Path, python: str, work: Path) -> Check:
  """Our logits and llama.cpp's for one file (the story prompt, or the chat prompt when the file has a template)."""
  loaded = load_gguf(path)
  template = loaded.chat_template
  prompt = STORY if template is None else template.apply_chat_template(QUESTION)
  ids = loaded.tokenizer.encode(prompt)
  forward = jax.jit(lambda p, t: Llama(loaded.config).apply({"params": p}, t))
  ours = np.asarray(forward(lb.dequantize(loaded.params), jnp.asarray([ids], jnp.int32))[0])
  npy = work / (path.stem + ".npy")
  done = subprocess.run([python, "-c", _LLAMACPP_SIDE, str(path), prompt, str(npy)], check=True, capture_output=True,
                        text=True)
  theirs_ids = json.loads(done.stdout.strip().splitlines()[-1])["ids"]
  theirs = np.load(npy)
  n = min(len(ids), len(theirs_ids))
  a, b = ours[:n], theirs[:n]
  diff = np.abs(a - b)
  return Check(label, path, path.stat().st_size, len(ids), ids == theirs_ids, float(diff.max()),
               float(diff.max() / a.std()), float(top1_agreement(a, b)), float(kl_divergence(a, b)))


def llamacpp_version(python: str) -> str:
  return subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"], check=True,
                        capture_output=True, text=True).stdout.strip()


def write(checks: list[Check], version: str, note: str) -> None:
  rows = [f"| {c.label} | {c.size:,} | {c.n_tokens} | {'yes' if c.same_ids else 'NO'} | {c.max_abs:.2e} | "
          f"{c.rel:.2e} | {c.top1:.3f} | {c.kl:.2e} |" for c in checks]
  RESULTS.write_text(textwrap.dedent(f"""\
      # llama.cpp runs our GGUF exports (stories260K, SmolLM2-135M-Instruct)

      Produced by `python -m experiments.llamacpp_check` (needs the separate llama-cpp-python install described in
      its docstring). llama-cpp-python {version}, llama.cpp built from source on this CPU{note}.

      Prompts: stories260K files get "{STORY}" (BOS first); SmolLM2 files get the chat template's rendering of
      {QUESTION} (our `ChatTemplate`, from the exported file's `tokenizer.chat_template`), whose special tokens
      (<|im_start|>, <|im_end|>) both tokenizers parse as such.

      Ours: `load_gguf(file)` run by our Flax Llama in float32. llama.cpp: `llama_cpp.Llama(file, logits_all=True,
      type_k=F32, type_v=F32)` (a float32 KV cache: the default float16 cache alone moves the stories260K F32 file's
      logits by up to 1.3e-2), its own tokenizer (`tokenize(prompt, add_bos=True, special=True)`: BOS when the
      vocabulary asks for it), `eval(ids)`, the logits of every position. Columns: the prompt's tokens; whether both
      tokenizers give the same ids; max |logit difference| over all positions and the vocabulary, and the same
      divided by the std of our logits; top-1 agreement; mean KL(ours || llama.cpp) in nats per position.

      | file | bytes | tokens | same ids | max abs diff | / std | top-1 | KL |
      |---|---|---|---|---|---|---|---|
      """) + "\n".join(rows) + "\n\n" + textwrap.dedent("""\
      Every file loads and runs in llama.cpp and its tokenizer gives our ids (SentencePiece and GPT-2 BPE with
      special tokens). The F32 files compute the same function in both, up to summation order: the exported
      metadata (heads, GQA, RMSNorm epsilon, RoPE base 10000 and 100000, tied embeddings) and the unpermuted wq / wk
      (llama.cpp's `llama` RoPE rotates interleaved pairs, as our model does) are what llama.cpp needs. For F16 and
      the block types, llama.cpp's CPU matmuls first convert the activations to the weight type's `vec_dot_type`
      (F16; 8-bit Q8_0 / Q8_1 blocks, `ggml_vec_dot_q4_0_q8_0` and friends), which our float32 evaluation does
      not; that, not the weights (the same bytes in both), is the remaining difference, and it grows with depth
      (SmolLM2's 30 layers). The control row shows it: the Q8_0 file's own decoded values, written as F32, run in
      llama.cpp exactly as our Q8_0 model runs here.
      """))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--llamacpp-python", default="/tmp/llamacpp/bin/python",
                      help="the Python of the separate venv that has llama-cpp-python")
  parser.add_argument("--calib-windows", type=int, default=32)
  parser.add_argument("--install-note", default="", help="how llama-cpp-python was installed, for the results")
  args = parser.parse_args()
  version = llamacpp_version(args.llamacpp_python)
  checks = []
  with tempfile.TemporaryDirectory() as tmp:
    work = Path(tmp)
    for label, path in stories_files(work, args.calib_windows) + smollm2_files(work):
      checks.append(check(label, path, args.llamacpp_python, work))
      print(checks[-1])
  write(checks, version, args.install_note)


if __name__ == "__main__":
  main()
