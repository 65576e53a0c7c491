"""The README's result tables are copies of what the experiment scripts wrote, never numbers typed by hand: each
table is preceded by `<!-- source: experiments/results/<file>.md ... -->`, and every number in its value columns
(all but the first) is, at the precision shown, a number of those files."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:,\d{3})*(?:\.\d+)?")
SOURCE = re.compile(r"<!-- source: ((?:experiments/results/[\w.-]+\.md ?)+)-->")


def tables(text: str) -> list[tuple[int, list[str], str]]:
  """[(line number, the table's lines, the last non-blank line before it)] of a markdown text."""
  lines, out, i = text.splitlines(), [], 0
  while i < len(lines):
    if lines[i].startswith("|"):
      j = i
      while j < len(lines) and lines[j].startswith("|"):
        j += 1
      before = next((l for l in reversed(lines[:i]) if l.strip()), "")
      out.append((i + 1, lines[i:j], before))
      i = j
    else:
      i += 1
  return out


def numbers(text: str) -> list[tuple[float, int]]:
  """(value, decimals shown) of every number in `text`."""
  out = []
  for m in NUMBER.finditer(text):
    s = m.group().replace(",", "")
    out.append((float(s), len(s.partition(".")[2])))
  return out


def test_every_readme_table_names_its_source_and_copies_its_numbers():
  text = (ROOT / "README.md").read_text(encoding="utf-8")
  found = tables(text)
  assert len(found) >= 7
  for line, rows, before in found:
    src = SOURCE.fullmatch(before.strip())
    assert src, f"README.md:{line}: table without a `<!-- source: experiments/results/... -->` line before it"
    pool = {v for f in src.group(1).split() for v, _ in numbers((ROOT / f).read_text(encoding="utf-8"))}
    for row in rows[2:]:                                             # after the header and the --- line
      cells = row.strip("|").split("|")[1:]
      for value, places in numbers("|".join(cells)):
        assert any(abs(round(p, places) - value) < 0.5 * 10.0 ** -places for p in pool), (
            f"README.md:{line}: {value} in {row[:60]!r}... is not in {src.group(1).strip()}")


def test_a_typed_number_fails():
  """The check can fail: a table row whose number no source holds."""
  text = "<!-- source: experiments/results/ptq_table.md -->\n\n| a | b |\n| --- | --- |\n| x | 123456.789 |\n"
  (_, rows, before), = tables(text)
  pool = {v for v, _ in numbers((ROOT / SOURCE.fullmatch(before).group(1).strip()).read_text(encoding="utf-8"))}
  value, places = numbers(rows[2].split("|", 2)[2])[0]
  assert not any(abs(round(p, places) - value) < 0.5 * 10.0 ** -places for p in pool)
