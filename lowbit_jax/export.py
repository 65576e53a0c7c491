"""Quantize a Llama model and write it as a GGUF file llama.cpp runs: `python -m lowbit_jax.export`.

    python -m lowbit_jax.export --model stories260k --method gptq --type Q4_0 --out stories260K.Q4_0.gguf
    python -m lowbit_jax.export --model smollm2 --method rtn --type Q8_0 --out smollm2.Q8_0.gguf
    python -m lowbit_jax.export --model path/to/model.gguf --method awq --type Q4_1 --out model.Q4_1.gguf

The model is loaded (`load_gguf`; quantized tensors of the input file are taken as their float values), quantized
with the spec whose QArrays are exactly the blocks of the chosen type (`SPECS`: `q4_0_spec()`, `q4_1_spec()`,
`q8_0_spec()`) and written with `export_gguf`, which stores those codes and
scales as they are. RTN to a type without such a spec (F32 / F16 / BF16 / Q6_K / TQ1_0 / TQ2_0) leaves the
weights float and lets `export_gguf` convert or quantize them (llama.cpp's own reference quantizers); GPTQ and AWQ
need a spec and refuse those types.

Calibration (GPTQ, AWQ) follows experiments/ptq_table.py, on a shorter text: the calibration text's first
`Calib.max_chars` characters are tokenized (TinyStories: BOS before every blank-line-separated block; WikiText-2
and other text: one document, one BOS), `Calib.windows` start offsets are drawn uniformly by
`np.random.default_rng(seed)`, sorted, and the windows are fed to `lowbit_jax.calibrate` in batches of
`Calib.batch`, on the scanned model.
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

import lowbit_jax as lb
from lowbit_jax.assets import asset_path
from lowbit_jax.io.gguf import load_gguf
from lowbit_jax.io.gguf_export import ExportReport, export_gguf
from lowbit_jax.io.gguf_types import ExportType
from lowbit_jax.eval import Segmentation, sample_windows, token_stream
from lowbit_jax.io.loaded import LoadedModel
from lowbit_jax.models.llama import Llama, stack_layers
from lowbit_jax.spec import QuantSpec


class Method(enum.Enum):
  RTN = "rtn"
  GPTQ = "gptq"
  AWQ = "awq"

  @property
  def calibrated(self) -> bool:
    return self is not Method.RTN


@dataclasses.dataclass(frozen=True)
class Preset:
  """A known model: its GGUF asset and its calibration text."""
  asset: str
  calib_asset: str
  segmentation: Segmentation


PRESETS = {
    "stories260k": Preset("stories260K_gguf/stories260K.gguf", "tinystories/tinystories_train_first2MiB.txt",
                          Segmentation.BOS_PER_BLOCK),
    "smollm2": Preset("smollm2_135m_instruct_q4_1/SmolLM2-135M-Instruct.Q4_1.gguf", "wikitext2_raw/wiki.valid.raw",
                      Segmentation.ONE_DOCUMENT),
}
_DEFAULT_CALIB = ("wikitext2_raw/wiki.valid.raw", Segmentation.ONE_DOCUMENT)  # for a GGUF given by path

# The spec whose QArrays are exactly the ggml blocks of each type (ggml_blocks.from_qarray maps them).
SPECS: dict[ExportType, QuantSpec] = {
    ExportType.Q4_0: lb.q4_0_spec(),
    ExportType.Q4_1: lb.q4_1_spec(),
    ExportType.Q8_0: lb.q8_0_spec(),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calib:
  """Calibration windows: `windows` random windows of `length` tokens, `batch` per calibration batch, drawn from
  the calibration text's first `max_chars` characters (tokenizing all 2 MiB of TinyStories takes 5 s; 256 Ki
  characters are ~130K tokens, 16 times what 32 windows of 256 read)."""
  windows: int = 32
  length: int = 256
  batch: int = 8
  seed: int = 0
  max_chars: int = 1 << 18


def calibration_batches(stream: np.ndarray, calib: Calib) -> list[jax.Array]:
  """`calib.windows` sorted random windows of `stream` (seeded), in batches of `calib.batch`."""
  return sample_windows(stream, n=calib.windows, length=calib.length, batch=calib.batch, seed=calib.seed)


def quantize_for(model: LoadedModel, method: Method, export: ExportType, batches: list[jax.Array] | None) -> Any:
  """The params to export: quantized by `method` with `SPECS[export]`, or float (RTN without a spec).

  Raises:
    ValueError: for GPTQ / AWQ to a type without a spec, or without calibration batches.
  """
  params = lb.dequantize(model.params)  # a quantized input file's QArrays as float32
  spec = SPECS.get(export)
  if method is Method.RTN:
    return params if spec is None else lb.rtn(params, None, spec)
  if spec is None:
    raise ValueError(f"{method.value} needs a type with a matching spec, one of {[t.value for t in SPECS]}; got "
                     f"{export.value}")
  if not batches:
    raise ValueError(f"{method.value} needs calibration batches")
  n = model.config.n_layers
  net = Llama(model.config, scan_layers=True)
  stacked = jax.device_put(stack_layers(params, n))
  calib = lb.calibrate(lambda p, tokens: net.apply({"params": p}, tokens), stacked, batches)
  algorithm = lb.gptq if method is Method.GPTQ else lb.awq
  return algorithm(stacked, calib, spec)


@dataclasses.dataclass(frozen=True)
class Run:
  """What `run` wrote (`report`) and how long loading, quantizing and writing took."""
  report: ExportReport
  seconds: float


def run(model: str, method: Method, export: ExportType, out: Path, calib: Calib = Calib()) -> Run:
  """Loads `model` (a `PRESETS` name or a GGUF path), quantizes it and writes `out`."""
  t0 = time.perf_counter()
  preset = PRESETS.get(model)
  path = asset_path(preset.asset) if preset else Path(model)
  loaded = load_gguf(path)
  batches = None
  if method.calibrated:
    calib_asset, segmentation = (preset.calib_asset, preset.segmentation) if preset else _DEFAULT_CALIB
    text = asset_path(calib_asset).read_text(encoding="utf-8")[:calib.max_chars]
    stream = token_stream(text, loaded.tokenizer, segmentation)
    batches = calibration_batches(stream, calib)
  params = quantize_for(loaded, method, export, batches)
  name = f"{path.stem} {method.value} {export.value} (lowbit_jax)"
  report = export_gguf(out, loaded.config, params, loaded.tokenizer, tensor_type=export,
                       chat_template=loaded.chat_template, name=name)
  return Run(report, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m lowbit_jax.export", description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, help=f"one of {sorted(PRESETS)} or the path of a llama GGUF file")
  parser.add_argument("--method", type=Method, choices=list(Method), default=Method.RTN,
                      metavar="{" + ",".join(m.value for m in Method) + "}")
  parser.add_argument("--type", type=_export_type, choices=list(ExportType), default=ExportType.Q4_0,
                      dest="export_type", metavar="{" + ",".join(t.value for t in ExportType) + "}")
  parser.add_argument("--out", type=Path, required=True, help="the GGUF file to write")
  parser.add_argument("--calib-windows", type=int, default=Calib.windows, help="GPTQ / AWQ calibration windows")
  parser.add_argument("--calib-len", type=int, default=Calib.length, help="tokens per calibration window")
  parser.add_argument("--table", action="store_true", help="print every tensor's type")
  args = parser.parse_args(argv)
  if args.model not in PRESETS and not Path(args.model).is_file():
    parser.error(f"--model {args.model!r} is neither one of {sorted(PRESETS)} nor an existing file")
  if args.method.calibrated and args.export_type not in SPECS:
    parser.error(f"--method {args.method.value} needs --type one of {[t.value for t in SPECS]}")
  result = run(args.model, args.method, args.export_type, args.out,
               Calib(windows=args.calib_windows, length=args.calib_len))
  rep = result.report
  print(rep.table() if args.table else rep.summary())
  if not args.table:
    print(f"fallbacks: {', '.join(f'{n} ({_type(rep, n)})' for n in rep.fallbacks) or 'none'}")
    print(f"requantized: {', '.join(rep.requantized) or 'none'}")
  print(f"done in {result.seconds:.1f} s")


def _export_type(name: str) -> ExportType:
  """argparse's converter of --type (its name appears in argparse's "invalid _export_type value" message)."""
  return ExportType.of(name.upper())


def _type(report: ExportReport, name: str) -> str:
  return next(t.ggml_type.name for t in report.tensors if t.name == name)


if __name__ == "__main__":
  main()
