"""Every figure a results page quotes traces to the JSON a script wrote.

For each Markdown table in docs/results.md (and in the other pages of ``PAGES``), the JSON files linked
(``](results/NAME.json)``) in its section
(the text from the table's heading to the next heading, plus the introductions of the headings above it) are
the table's sources. Every decimal figure in the table's cells, other than the row labels and the columns
in ``NOT_FROM_JSON``, must be a value of those files as the docs round it: ``pass_at_1`` x 100, ``std`` x 100,
``wiki_ppl`` and so on, at the figure's own number of decimals, or in millions with an ``M``. "kept" columns
are recomputed from the row's pass@1 and the table's BF16 figure, and "over ..." columns from the two rows
they compare. A figure from elsewhere is marked in the prose, outside the tables, or left out.

Every JSON record under docs/results/ names its command (``command`` or ``commands``), device, date and git
commit, or says in a ``provenance`` note why a key is missing (records written before the scripts recorded
the commit); ``NOT_BENCHMARK_RECORDS`` lists the files that are not a script's record.
"""

from __future__ import annotations

import json
import re
from decimal import ROUND_HALF_DOWN, ROUND_HALF_UP, Decimal
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
RESULTS_PAGE = DOCS / "results.md"
PAGES = ("evaluation.md", "models.md", "flatquant.md", "serving.md", "training.md", "architecture.md",
         "performance.md")
"""Pages beside results.md whose tables are checked the same way (a table that quotes no decimal figure, such
as a support matrix, needs no source)."""

NO_MEASUREMENTS = {
    "| scheme | format | why |": "architecture.md's export formats: its one decimal is a version "
                                 "(compressed-tensors 0.18)",
}
"""Tables (by their header line) of the other pages whose decimals are not measurements, and why."""
RECORDS = DOCS / "results"

LINK = re.compile(r"\]\(results/([\w.+-]+\.json)\)")
HEADING = re.compile(r"^(#{1,6}) ")
# a decimal figure: 65.6, 1,976.0, 2.0M (millions); not part of a longer token (1e-4, v0.14.0, W3G128)
FIGURE = re.compile(r"(?<![\w.,])(\d{1,3}(?:,\d{3})*\.\d+|\d+\.\d+)(M?)(?![\w.])")

NOT_FROM_JSON = {
    # training settings, not results
    "qat": "the QAT settings of the row",
    "build": "the teacher's training settings (its seconds are in the record it links)",
    "training seeds": None,  # checked: the per-seed figures in brackets (only the count is not a figure)
    # derived from a training curve: means over step ranges of the `training_curve` records
    "reward, steps 1-25 → 226-250": "means of the training reward over steps 1-25 and 226-250 "
                                     "(`training_curve` in the JSON)",
    "training reward, steps 1-25 → 226-250": "means of the training reward over steps 1-25 and 226-250 "
                                              "(`training_curve` in the JSON)",
}
"""Columns whose cells are not read from the JSON, and why (None: checked after all)."""

OVER = {"over FlatQuant PTQ": "FlatQuant+GPTQ"}
"""``over X`` columns: the row label of X, whose pass@1 the column's figures are measured against."""

SIDE_BY_SIDE = {
    "| method | W3G128 | kept | | method | W4A4KV4 | kept |": "two tables side by side (one row of each)",
    "| method | W3G128 | kept | W2G64 | kept |": "one scheme per column",
    "| W2G64 (BF16 84.1 ± 1.3) | 200 KD/SFT steps | kept | 1,000 KD steps | kept |": "one file per column",
    "| calibration \\ QAT data | math traces | Wikipedia |": "one run per cell (Table 3's grid)",
    "| modifier | Qwen3 (the testbeds, tiny test models) | Llama (SmolLM2-135M-Instruct) | Gemma 3 (270M) |":
        "models.md's support matrix: one architecture (and its own results file) per column",
    "| W3G128, GPTQ+KD then GRPO | seed 0 (1,500 problems) | seed 1 (1,000) | seed 2 (1,000) |":
        "one training seed per column",
    "| held-out `chain_sum` (4-7 terms), pass@1 | seed 0 | seed 1 | seed 2 | codes changed | "
    "training reward, steps 1-25 → 226-250 |": "one training seed per column; codes changed is a range over seeds",
    "| variant | 256 problems | tokens/s | 1,024 problems | tokens/s |": "performance.md: one file per problem count",
    "| variant | run 1 | run 2 |": "performance.md: one run of the same command per column",
    "| PTQ | pass@1 | layer 0 output MSE | layer 1 output MSE |":
        "flatquant.md: the RTN row's MSE are a FlatQuant row's `mse_before` (the layers without transforms)",
}
"""Tables (by their header line) whose rows put figures of several records side by side, one record per cell
(a range such as 1.05-1.10% spans records), and why."""

RANGE = re.compile(r"\d\.\d+ ?[-–] ?\d")

NOT_BENCHMARK_RECORDS = {
    "export_smollm2_w3_gptq_kd_run.json": "the run.json `rqat run` wrote for the exported model (started_at, "
                                          "host, versions and stages in place of a script's command record; "
                                          "results.md gives the command)",
}


def rounded(value: Decimal, places: int) -> set[Decimal]:
    """``value`` at ``places`` decimals; both neighbours at an exact tie (the script may have rounded an
    unrounded figure the JSON keeps at four decimals)."""
    quantum = Decimal(1).scaleb(-places)
    return {value.quantize(quantum, rounding=ROUND_HALF_UP), value.quantize(quantum, rounding=ROUND_HALF_DOWN)}


def spellings(value: Decimal) -> set[str]:
    """How the docs may print a JSON number: itself or x 100 (a fraction as a percentage) at 0 to 3 decimals,
    itself at up to 8 (a small loss: 0.00121713), or in millions at 1 or 2 decimals with an ``M`` (a parameter
    count: 0.46M)."""
    found = {str(r) for v in (value, value * 100) for places in range(4) for r in rounded(v, places)}
    found |= {str(r) for places in range(4, 9) for r in rounded(value, places)}
    return found | {f"{r}M" for places in (1, 2) for r in rounded(value / 1_000_000, places)}


def records(node, found: list[set[str]], root: bool = True) -> set[str]:
    """The spellings of every number under ``node``; appends those of each dict below the root to ``found``
    (a row of a results file, its BF16 record, a per-seed run: the records a table row quotes together)."""
    if isinstance(node, dict) or isinstance(node, list):
        below: set[str] = set()
        for value in node.values() if isinstance(node, dict) else node:
            below |= records(value, found, root=False)
        if isinstance(node, dict) and not root:
            found.append(below)
        return below
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return spellings(Decimal(repr(node)))
    return set()


@cache
def file_records(name: str) -> tuple[frozenset[str], ...]:
    """The records of one results file (see :func:`records`), the whole file last. The numbers at the top
    level of the file, outside its lists and dicts, are one record too (a flat file such as qat_kd_perf.json
    is a single run)."""
    found: list[set[str]] = []
    data = json.loads((RECORDS / name).read_text())
    everything = records(data, found)
    if isinstance(data, dict):
        found.append({s for value in data.values() if not isinstance(value, (dict, list))
                      for s in records(value, [], root=False)})
    return (*map(frozenset, found), frozenset(everything))


def spelled(figure: str, millions: bool) -> str:
    return str(Decimal(figure.replace(",", ""))) + ("M" if millions else "")


def figure_in(figure: str, millions: bool, sources: list[str]) -> bool:
    """Whether a figure as the docs print it is a number of the sources, as the docs round it."""
    return any(spelled(figure, millions) in file_records(name)[-1] for name in sources)


def in_one_record(figures: list[str], sources: list[str]) -> bool:
    """Whether figures (as :func:`spelled` writes them) are all numbers of one record of one source."""
    return any(all(f in record for f in figures) for name in sources for record in file_records(name)[:-1])


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def first_figure(cell: str) -> Decimal | None:
    match = FIGURE.search(cell)
    return Decimal(match.group(1).replace(",", "")) if match else None


def tables(text: str):
    """``(heading, lines of the table, JSON files its section links)`` for every table of a page."""
    lines = text.splitlines()
    fenced, inside = set(), False  # code blocks: their "# ..." lines are comments and "| ..." lines output
    for i, line in enumerate(lines):
        if line.startswith("```"):
            inside = not inside
        if inside or line.startswith("```"):
            fenced.add(i)
    heads = [(i, len(m.group(1))) for i, line in enumerate(lines) if i not in fenced and (m := HEADING.match(line))]

    def section_links(index: int) -> list[str]:
        start = max((i for i, _ in heads if i <= index), default=0)
        level = next((lv for i, lv in heads if i == start), 0)
        end = next((i for i, _ in heads if i > start), len(lines))
        found = LINK.findall("\n".join(lines[start:end]))
        # the introductions of the headings above: from each ancestor to its first sub-heading
        for i, lv in reversed([h for h in heads if h[0] < start]):
            if lv < level:
                level = lv
                intro_end = next(j for j, _ in heads if j > i)
                found += LINK.findall("\n".join(lines[i:intro_end]))
        return sorted(set(found))

    block: list[int] = []
    for i, line in enumerate([*lines, ""]):
        if line.lstrip().startswith("|") and i not in fenced:  # a table may be indented under a list item
            block.append(i)
            continue
        if block:
            heading = next((lines[h] for h, _ in reversed(heads) if h < block[0]), "")
            yield (heading, [lines[j].strip() for j in block], section_links(block[0]),
                   "\n".join(lines[:block[0]]))
            block = []


def bf16_figure(header: list[str], rows: list[list[str]], before: str, column: int) -> tuple[Decimal | None, str]:
    """The table's BF16 pass@1: its BF16 row, else a "BF16 x" in its header, else the last in the prose above."""
    for row in rows:
        if any(label.startswith("BF16") for label in row[:2]) and (value := first_figure(row[column])) is not None:
            return value, ""
    for text in (" ".join(header), before[-3000:]):
        found = re.findall(r"BF16[^0-9|]{0,40}?\**(\d+\.\d)", text)
        if found:
            return Decimal(found[-1]), found[-1]
    return None, ""


def table_problems(heading: str, block: list[str], sources: list[str], before: str,
                   page: str = "results.md") -> list[str]:
    where = f"{page}, table under {heading!r}"
    if page != "results.md" and (block[0] in NO_MEASUREMENTS or not any(FIGURE.search(line) for line in block[2:])):
        return []  # quotes no measured figure (a support matrix, a list of sources)
    if not sources:
        return [f"{where}: its section links no results/*.json"]
    missing = [name for name in sources if not (RECORDS / name).is_file()]
    if missing:
        return [f"{where}: links missing files {missing}"]
    header = cells(block[0])
    rows = [cells(line) for line in block[2:]]
    found = []
    quoted: list[dict[int, list[str]]] = [{} for _ in rows]
    for column, name in enumerate(header):
        key = name.strip("*").strip()
        if column == 0 or (key.lower() in NOT_FROM_JSON and NOT_FROM_JSON[key.lower()] is not None):
            continue
        # the pass@1 a kept or over column is computed from: the pass@1 column, else the nearest on the left
        value_column = next((c for c in range(column) if "pass@1" in header[c]), 0) or max(
            (c for c in range(1, column) if header[c] not in ("±", "kept") and not header[c].startswith("over ")),
            default=0)
        if key.lower() == "kept":
            bf16, bf16_quoted = bf16_figure(header, rows, before, value_column)
            if bf16 is None:
                found.append(f"{where}: 'kept' without a BF16 figure to recompute it from")
                continue
            if bf16_quoted and not figure_in(bf16_quoted, False, sources):
                found.append(f"{where}: BF16 {bf16_quoted} (header or prose) is not in {sources}")
            for row in rows:
                found += kept_problems(where, row, row[column], first_figure(row[value_column]), bf16)
            continue
        if key in OVER:
            base_row = next(row for row in rows if row[0] == OVER[key])
            for row in rows:
                found += over_problems(where, row, row[column], first_figure(row[value_column]),
                                       first_figure(base_row[value_column]))
            continue
        # a "±" column belongs with the figure before it
        cell_of_column = column - 1 if key == "±" and column > 1 else column
        for r, row in enumerate(rows):
            for match in FIGURE.finditer(row[column]):
                if not figure_in(match.group(1), bool(match.group(2)), sources):
                    found.append(f"{where}, row {row[0]!r}, column {key!r}: {match.group(0)} is not in {sources}")
                quoted[r].setdefault(cell_of_column, []).append(spelled(match.group(1), bool(match.group(2))))
    # the figures of a row come from one record (a row of the file, its BF16 record), or, in the tables
    # that put several records side by side, each cell's figures do
    for row, by_cell in zip(rows, quoted, strict=True):
        figures = [f for cell in by_cell.values() for f in cell]
        if not figures or in_one_record(figures, sources):
            continue
        if block[0] not in SIDE_BY_SIDE:
            found.append(f"{where}, row {row[0]!r}: its figures {figures} are not all in one record of {sources}")
            continue
        found += [f"{where}, row {row[0]!r}: {cell} are not in one record of {sources}"
                  for column, cell in by_cell.items()
                  if not RANGE.search(row[column]) and not in_one_record(cell, sources)]
    return found


def kept_problems(where: str, row: list[str], cell: str, value: Decimal | None, bf16: Decimal) -> list[str]:
    """A kept percentage against the one recomputed from the row's pass@1 and BF16, both rounded to 0.1."""
    if not cell:
        return []
    match = re.fullmatch(r"(\d+(?:\.\d)?)%", cell)
    if match is None or value is None:
        return [f"{where}, row {row[0]!r}: kept {cell!r} cannot be recomputed"]
    kept = Decimal(match.group(1))
    places = -kept.as_tuple().exponent
    half = Decimal("0.05")
    low = 100 * max(value - half, Decimal(0)) / (bf16 + half)
    high = 100 * (value + half) / (bf16 - half)
    if not min(rounded(low, places)) <= kept <= max(rounded(high, places)):
        return [f"{where}, row {row[0]!r}: kept {cell} but {value} / {bf16} is {100 * value / bf16:.1f}%"]
    return []


def over_problems(where: str, row: list[str], cell: str, value: Decimal | None, base: Decimal | None) -> list[str]:
    """A gain over another row against the difference of their figures (each rounded to 0.1)."""
    if not cell:
        return []
    if value is None or base is None:
        return [f"{where}, row {row[0]!r}: {cell!r} cannot be recomputed"]
    if abs(Decimal(cell) - (value - base)) > Decimal("0.1"):
        return [f"{where}, row {row[0]!r}: {cell} but the rows differ by {value - base}"]
    return []


def page_problems(text: str, page: str = "results.md") -> list[str]:
    found = []
    for heading, block, sources, before in tables(text):
        found += table_problems(heading, block, sources, before, page)
    return found


def test_results_page_figures_are_in_the_json_their_sections_link():
    problems = page_problems(RESULTS_PAGE.read_text())
    assert not problems, "\n".join(problems)


def test_results_page_covers_every_table():
    """The check sees the page's tables, the real-model section's among them."""
    found = list(tables(RESULTS_PAGE.read_text()))
    headings = {heading for heading, *_ in found}
    assert len(found) >= 20
    assert "### Gemma 3 270M, W3G128" in headings
    assert "### SmolLM2, W3 and W2G64, rebuilt teacher" in headings
    assert "### The teachers" in headings


@pytest.mark.parametrize("page", PAGES)
def test_other_pages_figures_are_in_the_json_their_sections_link(page):
    problems = page_problems((DOCS / page).read_text(), page)
    assert not problems, "\n".join(problems)


def test_other_pages_checked_tables():
    """The indented tables of evaluation.md (under list items) and flatquant.md's are seen, with their sources."""
    seen = {(page, heading): sources for page in PAGES
            for heading, _, sources, _ in tables((DOCS / page).read_text())}
    assert seen[("evaluation.md", "### The long-chain testbed")] == [
        "testbed_sensitivity.json", "testbed_sensitivity_depth.json"]
    assert seen[("flatquant.md", "## Measured on the testbed")] == ["flatquant_testbed.json"]


@pytest.mark.parametrize(("page", "original", "typo"), [
    ("evaluation.md", "| `long` | 0.46M | 83.2 | **62.3** | 72.2 | 80.5 |",
     "| `long` | 0.46M | 83.2 | **62.3** | 72.7 | 80.5 |"),
    ("evaluation.md", "| 6 layers | 1.25M | 206 s | 90.3 | 88.0 | 88.5 | 91.3 |",
     "| 6 layers | 1.25M | 206 s | 90.3 | 88.0 | 88.5 | 91.8 |"),
    ("flatquant.md", "| FlatQuant+RTN | 91.5 | 0.115 | 1.18 |", "| FlatQuant+RTN | 91.5 | 0.115 | 1.28 |"),
    ("flatquant.md", "| RTN | 86.0 | 0.235 | 2.48 |", "| RTN | 85.0 | 0.235 | 2.48 |"),
    # a flat file's top-level figures (qat_kd_perf.json), a loss at 8 decimals, one file per column
    ("performance.md", "| **258.1** | 31,741 | **28.4** |", "| **258.1** | 31,741 | **28.3** |"),
    ("performance.md", "| 1 GPU | 5.5 | 0.00121713 | 82.5 ± 0.8 |", "| 1 GPU | 5.5 | 0.00121731 | 82.5 ± 0.8 |"),
    ("performance.md", "| W4A4 | 1.49 s | 12,752 | 2.00 s | 38,761 |", "| W4A4 | 1.49 s | 12,752 | 2.02 s | 38,761 |"),
])
def test_a_typo_in_another_pages_figure_fails_the_check(page, original, typo):
    text = (DOCS / page).read_text()
    assert text.count(original) == 1
    assert page_problems(text, page) == []
    assert page_problems(text.replace(original, typo), page) != []


@pytest.mark.parametrize(("original", "typo"), [
    ("| RTN | 65.6 ± 1.9 | 78% |", "| RTN | 65.7 ± 1.9 | 78% |"),          # a pass@1 figure
    ("| RTN | 65.6 ± 1.9 | 78% |", "| RTN | 65.6 ± 1.8 | 78% |"),          # its spread
    ("| RTN | 65.6 ± 1.9 | 78% |", "| RTN | 65.6 ± 1.9 | 75% |"),          # a kept percentage
    ("| GPTQ | 73.3 | 1.2 | 91% | 176.7 |", "| GPTQ | 73.3 | 1.2 | 91% | 167.7 |"),  # a perplexity
    ("| FlatQuant+GPTQ+KD | 1,000 steps, lr 1e-4 | 78.2 ± 0.2 | 94% | +4.6 |",
     "| FlatQuant+GPTQ+KD | 1,000 steps, lr 1e-4 | 78.2 ± 0.2 | 94% | +5.6 |"),      # a gain over a row
])
def test_a_typo_in_a_quoted_figure_fails_the_check(original, typo):
    text = RESULTS_PAGE.read_text()
    assert text.count(original) == 1
    assert page_problems(text) == []
    assert page_problems(text.replace(original, typo)) != []


def test_benchmark_records_name_command_device_date_and_commit():
    problems = []
    for path in sorted(RECORDS.glob("*.json")):
        if path.name in NOT_BENCHMARK_RECORDS:
            continue
        record = json.loads(path.read_text())
        missing = [key for key in ("command", "device", "date", "commit") if key not in record]
        if "commands" in record and "command" in missing:
            missing.remove("command")
        unexplained = [key for key in missing if key not in record.get("provenance", "")]
        if unexplained:
            problems.append(f"{path.name}: no {unexplained}, and no 'provenance' note that says why")
    assert not problems, "\n".join(problems)


def test_the_not_benchmark_records_exist():
    for name in NOT_BENCHMARK_RECORDS:
        assert (RECORDS / name).is_file(), name
