"""fp32 perplexity of stories260K on TinyStories (in-domain) and WikiText-2 (out-of-domain): the baseline that every
quantized model is compared against.

Run from the repository root:  python -m experiments.fp32_perplexity   (or `python experiments/fp32_perplexity.py`
after `pip install -e .`). Prints a table and writes experiments/results/fp32_perplexity.md.

Windowing: `lowbit_jax.eval.perplexity` -- the token stream is cut into floor(N / 512) non-overlapping windows of
512 tokens (the model's training context), the remainder is dropped, and in each window the 511 tokens after the
first are scored (GPTQ's protocol).

Tokenization (llama2.c's pretokenization encodes every TinyStories story as BOS + encode(story.strip()) and
concatenates the stories, without EOS):
  * TinyStories, BOS_PER_BLOCK (the headline): the file's blank-line-separated blocks are treated as the stories:
    each is stripped, encoded with BOS in front, and the results are concatenated. The file cannot do better: its
    stories also contain blank lines between paragraphs, so story boundaries are not recoverable, and a block is
    a story or a paragraph of one (2150 blocks). Paragraphs that continue a story therefore get a spurious BOS.
  * TinyStories, ONE_DOCUMENT (for comparison): the whole file as one string, one BOS in front; stories then
    follow each other after a blank line instead of after BOS.
  * WikiText-2 test, ONE_DOCUMENT: the raw file (wiki.test.raw, byte for byte) as one string with one BOS in
    front, as the GPTQ/AWQ evaluations treat the test split as one document.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax

from lowbit_jax.assets import asset_path
from lowbit_jax.eval import PerplexityResult, Segmentation, perplexity, token_stream
from lowbit_jax.io.gguf import load_gguf
from lowbit_jax.models.llama import Llama, stack_layers


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  asset: str
  segmentation: Segmentation
  headline: bool


# ---- frozen config ------------------------------------------------------------------------------------------------
MODEL = "stories260K_gguf/stories260K.gguf"
SEQ_LEN = 512  # stories260K's training context (train.py --max_seq_len=512)
BATCH_SIZE = 8
SCAN_LAYERS = True
DATASETS = (
    Dataset("TinyStories val (part 1)", "tinystories/tinystories_val_part1.txt", Segmentation.BOS_PER_BLOCK, True),
    Dataset("TinyStories val (part 1)", "tinystories/tinystories_val_part1.txt", Segmentation.ONE_DOCUMENT, False),
    Dataset("WikiText-2 test", "wikitext2_raw/wiki.test.raw", Segmentation.ONE_DOCUMENT, True),
)
RESULTS = Path(__file__).resolve().parent / "results" / "fp32_perplexity.md"
# -------------------------------------------------------------------------------------------------------------------


def main() -> None:
  loaded = load_gguf(asset_path(MODEL))
  model = Llama(loaded.config, scan_layers=SCAN_LAYERS)
  params = stack_layers(loaded.params, loaded.config.n_layers) if SCAN_LAYERS else loaded.params
  params = jax.device_put(params)

  def apply_fn(p, tokens):
    return model.apply({"params": p}, tokens)

  rows: list[tuple[Dataset, int, PerplexityResult, float]] = []
  for ds in DATASETS:
    stream = token_stream(asset_path(ds.asset).read_text(encoding="utf-8"), loaded.tokenizer, ds.segmentation)
    t0 = time.perf_counter()
    result = perplexity(apply_fn, params, stream, seq_len=SEQ_LEN, batch_size=BATCH_SIZE)
    seconds = time.perf_counter() - t0
    rows.append((ds, int(stream.shape[0]), result, seconds))
    print(f"{ds.name} [{ds.segmentation.name}]: ppl {result.ppl:.4f} (nll {result.nll:.4f} nats), "
          f"{stream.shape[0]} tokens -> {result.n_windows} windows x {SEQ_LEN}, {result.n_tokens} scored, "
          f"{seconds:.1f} s")

  lines = [
      "# fp32 perplexity of stories260K",
      "",
      f"Written by `experiments/fp32_perplexity.py`. Model `{MODEL}` (all tensors F32, tied classifier), "
      f"jax {jax.__version__} on {jax.devices()[0].platform}, f32 forward pass.",
      "",
      f"Windowing: non-overlapping windows of seq_len={SEQ_LEN} (the training context); floor(N/{SEQ_LEN}) windows, "
      f"remainder dropped; in each window tokens 1..{SEQ_LEN - 1} are scored given the window's earlier tokens "
      f"(the first token of each window is not scored). ppl = exp(total nll / scored tokens).",
      "",
      "| dataset | tokenization | tokens | windows | scored tokens | nll (nats) | ppl | time (s) |",
      "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for ds, n, r, seconds in rows:
    name = f"**{ds.name}**" if ds.headline else ds.name
    lines.append(f"| {name} | {ds.segmentation.name}: {ds.segmentation.value} | {n} | {r.n_windows} | "
                 f"{r.n_tokens} | {r.nll:.4f} | {r.ppl:.4f} | {seconds:.1f} |")
  lines += [
      "",
      "Bold rows are the headline numbers. TinyStories story boundaries are not recoverable from the file (stories "
      "contain blank lines too), so BOS_PER_BLOCK puts a BOS before every paragraph-or-story block, while llama2.c "
      "trained with a BOS before every story only; ONE_DOCUMENT has no BOS between stories at all. The truth lies "
      "between the two rows. For scale: llama2.c reports a validation loss of 1.2968 for this model on its own "
      "pretokenized TinyStories validation shard.",
      "",
  ]
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text("\n".join(lines), encoding="utf-8")
  print(f"wrote {RESULTS}")


if __name__ == "__main__":
  main()
