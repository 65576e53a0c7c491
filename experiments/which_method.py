"""Which method when: a one-page guide generated from the project's own measured tables (never hand-edited).

    python experiments/which_method.py        # writes experiments/results/which_method.md (standard library only)

Parses the markdown tables the experiments wrote in experiments/results/ (ptq_table.md, smollm2_table[_uniform].md,
smollm2_table_mixed.md, sparsity_vs_quant_*.md, qat_table.md, qlora_smollm2.md, streamed_gptq.md, allocate_table.md)
and looks every number up by file, section and row label. The page: what each method costs (calibration data, time,
stored bits per weight) and keeps (perplexity gap to the float row *of the same file*, i.e. the same windows), then
recommendations that compare the parsed numbers and name the winner, so a rerun after new results stays true; every
number cites its file and row. A missing file, row or cell raises `WhichMethodError` naming it; the OPTIONAL files
drop their rows and bullets when absent. tests/test_which_method.py checks the committed page is a regeneration.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
OUT = "which_method.md"
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")
PTQ, MIXED, SPARSE = "ptq_table.md", "smollm2_table_mixed.md", "sparsity_vs_quant_{}.md"
QAT, QLORA, STREAMED, ALLOC = "qat_table.md", "qlora_smollm2.md", "streamed_gptq.md", "allocate_table.md"
OPTIONAL = (MIXED, QAT, QLORA, STREAMED, ALLOC)
SM_FLOAT = "unquantized (Q4_1 dequantized, f32)"
FLOAT = {PTQ: "fp32", "smollm2_table.md": SM_FLOAT, "smollm2_table_uniform.md": SM_FLOAT, MIXED: SM_FLOAT,
         SPARSE.format("stories260k"): "fp32 (unpruned)", SPARSE.format("smollm2"): "fp32 (unpruned)",
         ALLOC: ("-", "fp32", "-")}
SETS = {"stories260K": ("TinyStories", "WikiText-2"), "SmolLM2": ("WikiText-2", "TinyStories")}
COLUMN = {"TinyStories": "ppl TinyStories val (part 1)", "WikiText-2": "ppl WikiText-2 test"}
EVAL = re.compile(r"the first \d+ windows of \d+ tokens")


class WhichMethodError(ValueError):
  """A results file, table, row or cell the page needs is missing or unreadable (the message names it)."""


@dataclasses.dataclass(frozen=True)
class Table:
  section: str                     # the last "## " heading above it ("" before any)
  header: tuple[str, ...]
  rows: tuple[tuple[str, ...], ...]


@dataclasses.dataclass(frozen=True)
class Num:
  value: float
  text: str                        # as the file writes it


def parse_tables(text: str) -> list[Table]:
  """Every markdown table of `text` (a header line, the `---` line, rows)."""
  out, section, block = [], "", []
  for line in text.splitlines() + [""]:
    if line.startswith("|"):
      block.append(tuple(c.strip() for c in line.strip().strip("|").split("|")))
      continue
    if len(block) >= 2:
      out.append(Table(section, block[0], tuple(block[2:])))
    block = []
    section = line[3:].strip() if line.startswith("## ") else section
  return out


def label_of(key) -> str:
  return " | ".join(key) if isinstance(key, tuple) else key


class Results:
  """The results files of one folder, parsed on first use; `refs` collects the rows looked up."""

  def __init__(self, root: pathlib.Path):
    self.root, self.cache, self.refs = pathlib.Path(root), {}, []

  def has(self, name: str) -> bool:
    return name not in OPTIONAL or (self.root / name).is_file()

  def text(self, name: str) -> str:
    path = self.root / name
    if not path.is_file():
      raise WhichMethodError(f"{path}: missing; run the experiment that writes it (see the README)")
    return path.read_text(encoding="utf-8")

  def cell(self, name: str, row, column: str, section: str = "") -> str:
    if name not in self.cache:
      self.cache[name] = parse_tables(self.text(name))
    key = row if isinstance(row, tuple) else (row,)
    found = [(t, r) for t in self.cache[name] if column in t.header and t.section.startswith(section)
             for r in t.rows if r[:len(key)] == key]
    where = f"{self.root / name}: row {label_of(row)!r}, column {column!r}" + (f", section {section!r}" * bool(section))
    if len(found) != 1:
      raise WhichMethodError(f"{where}: {'no such row' if not found else f'{len(found)} tables hold it'}")
    (table, r), = found
    self.refs.append((name, f"`{label_of(row)}`"))
    return r[table.header.index(column)] if table.header.index(column) < len(r) else ""

  def num(self, name: str, row, column: str, section: str = "", index: int = 0) -> Num:
    text = self.cell(name, row, column, section)
    found = NUMBER.findall(text)
    if len(found) <= index:
      raise WhichMethodError(f"{self.root / name}: row {label_of(row)!r}, column {column!r}: expected a number, "
                             f"got {text!r}")
    return Num(float(found[index].replace(",", "")), found[index])

  def prose(self, name: str, pattern: re.Pattern) -> str:
    m = pattern.search(self.text(name))
    if m is None:
      raise WhichMethodError(f"{self.root / name}: no text matching {pattern.pattern!r}")
    self.refs.append((name, "(header)"))
    return m.group()

  def take_refs(self) -> str:
    """The rows looked up since the last call, grouped by file: "a.md `x`, `y`; b.md `z`"."""
    by_file: dict[str, list[str]] = {}
    for f, row in self.refs:
      rows = by_file.setdefault(f, [])
      if row not in rows:
        rows.append(row)
    self.refs = []
    return "; ".join(f"{f} {', '.join(rows)}" for f, rows in by_file.items())


def pct(a: Num, b: Num) -> float:
  return 100.0 * (a.value / b.value - 1.0)


def fmt_pct(g: float) -> str:
  return f"{g:+.2f} %" if abs(g) < 1 else f"{g:+.1f} %" if abs(g) < 1000 else f"{g:+,.0f} %"


def gaps(res: Results, name: str, row, model: str, section: str = "", float_file: str = "") -> dict:
  """{set: perplexity gap in %} of `row` to the float row of `float_file` (default: the same file)."""
  ref = float_file or name
  return {s: pct(res.num(name, row, COLUMN[s], section), res.num(ref, FLOAT[ref], COLUMN[s])) for s in SETS[model]}


# --- Table 1: post-training quantization on both models --------------------------------------------------------------
# (method, bits, calibration data, stories260K row of ptq_table.md, SmolLM2 (file, row)); "SM": the uniform table.
NO, H, ABS, MEAN = "none", "Hessian XᵀX", "activation absmax", "activation mean abs"
PTQ_ROWS = [
    ("RTN", "8", NO, "RTN w8 per-channel", ("SM", "RTN w8 per-channel")),
    ("SmoothQuant W8A8", "8 (+ int8 activations)", ABS, "SmoothQuant W8A8", ("SM", "SmoothQuant W8A8")),
    ("LLM.int8()", "8 (+ float outlier columns)", NO, "LLM.int8()", ("SM", "LLM.int8()")),
    ("FP8 E4M3", "8", NO, "FP8 E4M3", ("SM", "FP8 E4M3")),
    ("RTN", "4", NO, "RTN w4 g32", ("SM", "RTN w4 g128")),
    ("NF4 + DQ", "4", NO, "NF4 (+DQ)", ("SM", "NF4 (+DQ)")),
    ("AWQ", "4", MEAN, "AWQ w4 g32", ("SM", "AWQ w4 g128")),
    ("GPTQ, no act-order", "4", H, "GPTQ w4 g32", ("SM", "GPTQ w4 g128")),
    ("GPTQ act-order", "4", H, "GPTQ w4 g32 act-order", (MIXED, "GPTQ w4 g128 act-order")),
    ("RTN", "3", NO, "RTN w3 g32", ("SM", "RTN w3 g128")),
    ("AWQ", "3", MEAN, "AWQ w3 g32", ("SM", "AWQ w3 g128")),
    ("GPTQ, no act-order", "3", H, "GPTQ w3 g32", ("SM", "GPTQ w3 g128")),
    ("GPTQ act-order", "3", H, "GPTQ w3 g32 act-order", (MIXED, "GPTQ w3 g128 act-order")),
    ("RTN", "2", NO, None, ("SM", "RTN w2 g64")),
    ("AWQ", "2", MEAN, None, ("SM", "AWQ w2 g64")),
    ("GPTQ, no act-order", "2", H, None, ("SM", "GPTQ w2 g64")),
]


@dataclasses.dataclass
class PtqRow:
  idx: int
  method: str
  bits: str
  calib: str
  cells: dict        # model -> {"bits", "time": Num, "gaps": {set: %}, "ppl": {set: Num}}, or None


def smollm2_file(res: Results) -> str:
  return "smollm2_table_uniform.md" if (res.root / "smollm2_table_uniform.md").is_file() else "smollm2_table.md"


def ptq_rows(res: Results, sources: list[str]) -> list[PtqRow]:
  sm, rows = smollm2_file(res), []
  for method, bits, calib, s_row, (f, m_row) in PTQ_ROWS:
    cells = {}
    for model, name, row in (("stories260K", PTQ, s_row), ("SmolLM2", sm if f == "SM" else f, m_row)):
      cells[model] = None if row is None or not res.has(name) else dict(
          bits=res.num(name, row, "bits/weight (linear)"), time=res.num(name, row, "quant time (s)"),
          gaps=gaps(res, name, row, model), ppl={s: res.num(name, row, COLUMN[s]) for s in SETS[model]})
    if any(cells.values()):
      rows.append(PtqRow(len(sources) + 1, method, bits, calib, cells))
      sources.append(res.take_refs())
  return rows


def ptq_table(rows: list[PtqRow]) -> list[str]:
  out = ["| method | bits | calibration data | bits/weight stored, stories260K / SmolLM2 | quantize time (s), "
         "stories260K / SmolLM2 | ppl gap, stories260K: TinyStories / WikiText-2 | ppl gap, SmolLM2: WikiText-2 / "
         "TinyStories | src |", "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
  joined = lambda *cells: " / ".join(c or "—" for c in cells)
  for r in rows:
    s, m = r.cells["stories260K"], r.cells["SmolLM2"]
    g = lambda c, model: joined(*(fmt_pct(c["gaps"][x]) for x in SETS[model])) if c else "—"
    out.append(f"| {r.method} | {r.bits} | {r.calib} | {joined(s and s['bits'].text, m and m['bits'].text)} | "
               f"{joined(s and s['time'].text, m and m['time'].text)} | {g(s, 'stories260K')} | {g(m, 'SmolLM2')} | "
               f"[{r.idx}] |")
  return out


# --- Table 2: training, sparsity, mixed precision, streaming ---------------------------------------------------------
@dataclasses.dataclass
class OtherRow:
  kind: str          # what the recommendations look it up by
  method: str
  model: str
  cost: str
  keeps: str
  alt: str           # the alternative it is measured against, with its numbers
  cmp: list          # [(what, this, alternative)]: lower is better
  idx: int = 0


def versus(kind, method, model, cost, this: dict, alt_label: str, alt: dict) -> OtherRow:
  text = lambda g: ", ".join(f"{s} {fmt_pct(v)}" for s, v in g.items())
  return OtherRow(kind, method, model, cost, text(this), f"{alt_label}: {text(alt)}",
                  [(s, this[s], alt[s]) for s in this])


def other_rows(res: Results):
  """Yields an OtherRow per measured comparison whose file exists (its lookups all done before it is yielded)."""
  if res.has(QAT):
    g = lambda row, sec: {"TinyStories": pct(res.num(QAT, row, "val ppl", sec), res.num(QAT, "fp32", "val ppl", sec))}
    yield versus("train", "QAT-4 per-channel (then RTN)", "stories260K", "training on the float weights",
                 g("QAT-4 (converted)", "A."), "RTN-4 PTQ", g("RTN-4 PTQ", "A."))
    yield versus("train", "QLoRA on an NF4 base", "stories260K", "adapter training, the base stays packed",
                 g("QLoRA NF4 (after)", "A."), "the NF4 base", g("NF4 base (QLoRA start)", "A."))
    yield versus("bitnet", "BitNet b1.58 (ternary), from scratch", "stories260K arch.",
                 "training from scratch; gap to fp32 trained the same steps",
                 g("BitNet b1.58 (packed ternary, quantized(apply))", "B."), "FP8 training",
                 g("FP8 (E4M3 forward, delayed scaling)", "B."))
  if res.has(QLORA):
    q, f, loss = "QLoRA (NF4 + DQ base)", "LoRA on the float32 model", "validation loss before -> after (nats)"
    frozen, peak, time = "frozen weights (MiB)", "peak RSS while training (MiB)", "training time, 40 steps (s)"
    c = lambda row, col, i=0: res.num(QLORA, row, col, index=i)
    yield OtherRow("qlora", "QLoRA on an NF4 base", "SmolLM2",
                   f"frozen weights {c(frozen, q).text} MiB (float LoRA: {c(frozen, f).text}), peak RSS "
                   f"{c(peak, q).text} MiB ({c(peak, f).text}), {c(time, q).text} s ({c(time, f).text})",
                   f"val loss {c(loss, q).text} -> {c(loss, q, 1).text} nats",
                   f"LoRA on the float model: {c(loss, f).text} -> {c(loss, f, 1).text}",
                   [(what, c(row, q, i).value, c(row, f, i).value)
                    for what, row, i in (("loss", loss, 1), ("frozen", frozen, 0), ("peak", peak, 0))])
  for model, key, g in (("stories260K", "stories260k", "g32"), ("SmolLM2", "smollm2", "g128")):
    name, n = SPARSE.format(key), lambda r, col: res.num(SPARSE.format(key), r, col).text
    for kind, row, alt in (("sparse24", f"SparseGPT 2:4 + int4 {g} (joint)", f"GPTQ int3 {g}"),
                           ("sparse50", "SparseGPT 50 % fp16", "GPTQ int8 per-channel")):
      plotted, stored = n(row, "b/w plotted"), n(row, "b/w stored (linear)")
      bits = plotted + ("" if plotted == stored else f" (bitmap formula; stored dense: {stored})")
      out = versus(kind, row, model, f"{bits} b/w, prune + quantize {n(row, 'prune + quant time (s)')} s",
                   gaps(res, name, row, model), f"{alt} at {n(alt, 'b/w plotted')} b/w", gaps(res, name, alt, model))
      out.cmp.append(("bits", res.num(name, row, "b/w plotted"), res.num(name, alt, "b/w plotted")))
      yield out
  if res.has(ALLOC):
    mixed, uni = ("INT3 g32", "GPTQ", "kl_weighted"), ("INT3 g32", "GPTQ", "uniform")
    b = lambda r: res.num(ALLOC, r, "bits/weight").text
    yield versus("mixed", "lb.allocate + GPTQ (no act-order) at int3 g32's bytes", "stories260K",
                 f"{b(mixed)} b/w (uniform: {b(uni)})", gaps(res, ALLOC, mixed, "stories260K"),
                 "uniform GPTQ int3 g32", gaps(res, ALLOC, uni, "stories260K"))
  if res.has(MIXED):
    mixed, uni = "GPTQ act-order mixed @ 3.521 b/w (INT3 g128's bytes)", "GPTQ w3 g128 act-order"
    t = lambda r, col: res.num(MIXED, r, col).text
    yield versus("mixed", "lb.allocate + GPTQ act-order at int3 g128's bytes", "SmolLM2",
                 f"{t(mixed, 'bits/weight (linear)')} b/w, {t(mixed, 'quant time (s)')} s (uniform: "
                 f"{t(uni, 'quant time (s)')} s)", gaps(res, MIXED, mixed, "SmolLM2"), "uniform GPTQ act-order",
                 gaps(res, MIXED, uni, "SmolLM2"))
  if res.has(STREAMED):
    held, t = "statistics held at once (MiB)", "calibrate + quantize (s)"
    for model, key in (("stories260K", "stories260k"), ("SmolLM2", "smollm2")):
      s = lambda r, col: res.num(STREAMED, r, col, model)
      row = versus("streamed", "lb.streamed(lb.gptq, ...)", model,
                   f"statistics held {s('streamed', held).text} MiB (whole model: {s('whole model', held).text}), "
                   f"calibrate + quantize {s('streamed', t).text} s ({s('whole model', t).text} s)",
                   gaps(res, STREAMED, "streamed", model, model, SPARSE.format(key)), "whole-model GPTQ",
                   gaps(res, STREAMED, "whole model", model, model, SPARSE.format(key)))
      row.cmp.append(("held", s("streamed", held), s("whole model", held)))
      yield row
      g = lambda r: gaps(res, STREAMED, r, model, model, SPARSE.format(key))
      yield versus("asymmetric", "lb.streamed(..., objective=lb.Objective.ASYMMETRIC)", model,
                   f"twice the cached activations, calibrate + quantize {s('streamed, asymmetric', t).text} s",
                   g("streamed, asymmetric"), "streamed with the reference's objective", g("streamed"))


def other_table(rows: list[OtherRow]) -> list[str]:
  return (["| method | model | what it costs | what it keeps: ppl gap to float | measured against | src |",
           "| --- | --- | --- | --- | --- | --- |"]
          + [f"| {r.method} | {r.model} | {r.cost} | {r.keeps} | {r.alt} | [{r.idx}] |" for r in rows])


# --- Recommendations: each compares parsed numbers and names the winner ----------------------------------------------
def tally(cmp) -> tuple[int, int, str]:
  """(how often `this` is lower, comparisons, "where: this vs alternative; ...") over [(where, this, alternative)]."""
  return (sum(a < b for _, a, b in cmp), len(cmp), "; ".join(f"{w} {fmt_pct(a)} vs {fmt_pct(b)}" for w, a, b in cmp))


def verdict(w: int, n: int, win: str, lose: str, tie: str = "") -> str:
  return win if 2 * w > n else lose if 2 * w < n or not tie else tie


def head_to_head(a: PtqRow, b: PtqRow) -> list:
  return [(f"{m} {s}", a.cells[m]["gaps"][s], b.cells[m]["gaps"][s]) for m in SETS
          if a.cells[m] and b.cells[m] for s in SETS[m]]


def bullets(ptq: list[PtqRow], other: list[OtherRow]) -> list[str]:
  find = lambda method, bits: next((r for r in ptq if r.method == method and r.bits == bits), None)
  src = lambda rows: "[" + "], [".join(str(r.idx) for r in rows) + "]"
  out = []
  eight = [r for r in ptq if r.bits.startswith("8")]
  worst = {r.method: max(g for c in r.cells.values() if c for g in c["gaps"].values()) for r in eight}
  best = min(eight, key=lambda r: worst[r.method])
  out.append(f"**8 bits**: every 8-bit method is within {fmt_pct(max(worst.values()))} of float on all sets of both "
             f"models; the smallest worst case is {best.method}'s ({fmt_pct(worst[best.method])}, calibration data: "
             f"{best.calib}){': it is enough' if best.calib == NO else ''}. {src(eight)}")
  for bits in ("4", "3"):
    rows = [r for r in ptq if r.bits == bits]
    per_set = [(f"{m} {s}", min(((r.cells[m]["ppl"][s], r) for r in rows if r.cells[m]), key=lambda x: x[0].value))
               for m in SETS for s in SETS[m]]
    out.append(f"**Best at {bits} bits**, lowest perplexity per set: "
               + "; ".join(f"{where}: {r.method} ({p.text} at {r.cells[where.split()[0]]['bits'].text} b/w)"
                           for where, (p, r) in per_set) + f". {src(rows)}")
  nf4, rtn4 = find("NF4 + DQ", "4"), find("RTN", "4")
  w, n, detail = tally(head_to_head(nf4, rtn4))
  fewer = all(nf4.cells[m]["bits"].value < rtn4.cells[m]["bits"].value for m in SETS)
  out.append(f"**4 bits without calibration data**: NF4 + DQ is below grouped RTN int4 on {w} of {n} sets ({detail}) "
             f"and stores {'fewer' if fewer else 'more'} bits per weight: "
             + verdict(w, n, "prefer NF4", "prefer grouped RTN", "NF4 for the bytes, a tie in quality")
             + f". {src([nf4, rtn4])}")
  pairs = [(find("GPTQ act-order", b), find("RTN", b)) for b in ("3", "4")]
  (w, n, detail), (w4, n4, _) = (tally(head_to_head(a, b)) for a, b in pairs)
  out.append(f"**GPTQ act-order vs RTN**: lower gap at 3 bits on {w} of {n} sets ({detail}), at 4 bits on {w4} of "
             f"{n4}: {verdict(w, n, 'use GPTQ act-order at 3 bits', 'RTN is as good here')}. "
             f"{src([r for p in pairs for r in p])}")
  ao = [(find("GPTQ act-order", b), find("GPTQ, no act-order", b)) for b in ("3", "4")]
  per_model = {m: tally([c for a, b in ao for c in head_to_head(a, b) if c[0].startswith(m)]) for m in SETS}
  out.append("**Act-order** (`lb.gptq`'s default) lowers GPTQ's gap in " + " and ".join(
      f"{w} of {n} (set, bits) pairs on {m} ({verdict(w, n, 'keep it', 'mostly worse here', 'a wash')})"
      for m, (w, n, _) in per_model.items()) + f"; at 3 bits: {tally(head_to_head(*ao[0]))[2]}. "
      f"{src([r for p in ao for r in p])}")
  two = [r for r in ptq if r.bits == "2" and r.cells["SmolLM2"]]
  best = min(two, key=lambda r: r.cells["SmolLM2"]["gaps"]["WikiText-2"])
  x = 1 + best.cells["SmolLM2"]["gaps"]["WikiText-2"] / 100
  out.append(f"**2 bits**: the best, {best.method}, is at {x:.1f}x float perplexity on SmolLM2 WikiText-2 "
             f"({best.cells['SmolLM2']['ppl']['WikiText-2'].text}): "
             f"{'none of the measured PTQ methods keeps the model usable below 3 bits' if x > 2 else 'usable'}. "
             f"{src(two)}")
  kinds = lambda *k: [r for r in other if r.kind in k]
  for kind, this, that, win, lose in (
      ("mixed", "Mixed precision (`lb.allocate`)", "uniform GPTQ at the same bytes",
       "worth it when a budget falls between formats", "not worth it here"),
      ("sparse24", "SparseGPT 2:4 + int4", "dense GPTQ int3", "2:4 pays here",
       "prefer dense quantization unless 2:4 tensor-core speed is the goal"),
      ("sparse50", "SparseGPT 50 % at float16", "GPTQ int8 per-channel", "unstructured sparsity pays here",
       "prefer int8"),
      ("streamed", "Streamed GPTQ", "whole-model GPTQ", "prefer it whenever the model is large",
       "use it only when the statistics do not fit"),
      ("asymmetric", "The asymmetric objective (GPTAQ)", "the reference's objective, both streamed",
       "prefer it when the calibration data is from the domain the model serves", "keep the reference's objective"),
      ("train", "QAT-4 and QLoRA", "RTN-4 PTQ and the NF4 base (stories260K)", "a training budget buys quality",
       "training did not pay here")):
    rows = kinds(kind)
    if rows:
      w, n, detail = tally([(r.method if kind == "train" else f"{r.model} {s}", a, b) for r in rows
                            for s, a, b in r.cmp if s in COLUMN])
      held = [f"{a.text} vs {b.text} MiB on {r.model}" for r in rows for s, a, b in r.cmp if s == "held"]
      bits = [(a, b) for r in rows for s, a, b in r.cmp if s == "bits"]
      fewer = ("fewer" if all(a.value < b.value for a, b in bits) else "more" if all(a.value > b.value for a, b in bits)
               else "about as many")
      extra = f"; statistics held at once: {'; '.join(held)}" if held else ""
      extra += f"; it stores {fewer} bits ({'; '.join(f'{a.text} vs {b.text}' for a, b in bits)})" if bits else ""
      out.append(f"**{this}** against {that}: lower gap on {w} of {n} sets ({detail}{extra}): "
                 f"{verdict(w, n, win, lose, win if held else lose)}. {src(rows)}")
  for r in kinds("qlora"):
    ratio = {s: a / b for s, a, b in r.cmp}
    out.append(f"**QLoRA on a real model** (SmolLM2): the packed NF4 base holds {ratio['frozen']:.3f}x the frozen "
               f"bytes of LoRA on the float model and peaks at {ratio['peak']:.3f}x its RSS; its final validation "
               f"loss is {abs(ratio['loss'] - 1) * 100:.1f} % {'lower' if ratio['loss'] < 1 else 'higher'}. {src([r])}")
  return out


# --- The page --------------------------------------------------------------------------------------------------------
def build_page(root: pathlib.Path = RESULTS) -> str:
  """The page's markdown from the results files under `root` (raises WhichMethodError naming what is missing)."""
  res, sources = Results(root), []
  ev = {m: res.prose(f, EVAL) for m, f in (("stories260K", PTQ), ("SmolLM2", smollm2_file(res)))}
  head = res.take_refs()
  ptq, other = ptq_rows(res, sources), []
  for row in other_rows(res):
    row.idx = len(sources) + 1
    other.append(row)
    sources.append(res.take_refs())
  return "\n".join([
      "# Which method when", "",
      "Generated by `python experiments/which_method.py` from the measured tables in experiments/results/ (do not "
      "edit; rerun after new results). *ppl gap*: a row's perplexity relative to the float row of the same file "
      f"(the same evaluation windows: stories260K {ev['stories260K']} of each set, SmolLM2-135M {ev['SmolLM2']}; "
      f"from {head}; the other files' windows are in their headers), in %. Bits/weight: what is stored (codes, "
      "padding, scales) over the linear weights. Times: the quantization call alone, compilation included, on the "
      "CPU. SmolLM2's weights come from a Q4_1 GGUF, so its 4-bit rows do not rank methods fairly. [n]: the source "
      "files and rows.", "",
      "## Post-training quantization (group sizes: see the source rows)", "",
      *ptq_table(ptq), "",
      "## Training, sparsity, mixed precision, streaming", "",
      *other_table(other), "",
      "## Recommendations (each computed from the rows cited)", "",
      *(f"- {b}" for b in bullets(ptq, other)), "",
      "## Sources (file and row label of every number above)", "",
      *(f"- [{i}] {s}" for i, s in enumerate(sources, 1))]) + "\n"


if __name__ == "__main__":
  (RESULTS / OUT).write_text(build_page(RESULTS), encoding="utf-8")
  print(f"wrote {RESULTS / OUT}")
