"""Every decimal number on a results page comes from a JSON written by a documented command.

**What is checked.** Every decimal number (digits, a point, digits: ``88.56``, ``0.50``, ``1.7·10⁻²⁷``)
in ``docs/*.md`` and in the ``## Results`` section of ``README.md`` must appear, to its printed
precision, among the numbers of the JSON files of its page:

- a paragraph of ``docs/X.md`` ↔ every ``*.json`` under ``docs/X/`` (recursively, so
  ``docs/iwae_table/**``), its ``run.json`` (the command, the resolved arguments and the machine)
  included, and the JSONs of the other results pages that paragraph links to (a paragraph citing
  another page's number links to it);
- a ``### `` subsection of README's ``## Results`` ↔ the JSONs of every ``docs/`` page or folder that
  subsection links to; a table row with links of its own ↔ the JSONs of those links only.

**Its strength, measured.** Matching is by value, not by JSON path, so a wrong number can pass by
coinciding with another value of the same page's JSONs: changing the last printed digit of every
number by 3 still passed for about 4 in 10 numbers when this test was written (results pages hold
thousands of values). It catches rounding twice, numbers in no JSON and copy errors into a page
whose JSON has no value nearby; naming the JSON path of each number would make it strict.

"To its printed precision" means rounding: ``88.6`` matches a JSON value ``x`` only if
``|x − 88.6| ≤ 0.05`` (so ``88.5499`` does not match ``88.6``; a number rounded twice fails). The sign
is not compared (pages write ``NLL 93.57`` for ``log p̂ = −93.57``, and ``−`` is also the range dash).
A mantissa with a power of ten (``6.6·10³²``, ``1.2 × 10⁻³``) is compared at the mantissa's precision.
The only conversions: a number followed by ``%`` (alone or after a slash-separated group,
``0.50 / 0.31 %``) may be a JSON fraction × 100, one followed by ``ms`` a JSON value in seconds ×
1000, and a JSON value under a key named ``log10_*`` also counts as 10 to its power. Lists of more
than ``RAW_LIST`` numbers (per-point raw data) are not searched.

**Exemptions, narrowly:**

1. Code: fenced code blocks and inline code spans (```` `--lr 1e-3` ````) are commands and
   configuration, not results.
2. Version numbers: three or more dot-separated parts (``2.14.1``).
3. Numbers quoted from a paper, marked on their own line with ``<!-- quoted: 86.76 86.47 -->``
   (an HTML comment listing the quoted numbers as printed). Only the listed numbers on that line
   are exempt; the marker is visible in the page's source and says what is not ours.
4. Numbers without a decimal point (counts, epochs, K, integers in prose) are not checked here.

Everything else, configuration values written in prose included, must be in the page's JSONs
(the arguments recorded in ``run.json`` hold the configuration).
"""

from __future__ import annotations

import bisect
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

SUPERSCRIPT = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻", "0123456789-")
NUMBER = re.compile(
    r"(?<![\w.])(\d+(?:\.\d+)+)"  # digits with one or more decimal parts
    r"(?:\s*[·×]\s*10([⁻]?[⁰¹²³⁴⁵⁶⁷⁸⁹]+)|e([+-]?\d+)\b)?"  # an optional power of ten (6.6·10³², 1.45e6)
    r"(\s*(?:%|ms\b))?"  # an optional unit that changes the scale
)
GROUP = re.compile(r"((?:\d+(?:\.\d+)?\s*/\s*)+\d+(?:\.\d+)?)\s*(%|ms\b)")
QUOTED = re.compile(r"<!--\s*quoted:([^>]*)-->")
LINK = re.compile(r"\(((?:\.\./)?docs/([\w]+)(?:[./][^)]*)?)\)")
PAGE_LINK = re.compile(r"\((?:\./)?([a-z_]+)(?:\.md|/)[^)]*\)")


RAW_LIST = 1000  # a list of more numbers than this is per-point raw data, not a result a page may quote


def _numbers(value: object, log10: bool = False) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        if log10 and abs(value) < 300:
            return [abs(float(value)), 10.0 ** value]
        return [abs(float(value))]
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in _numbers(v, log10 or str(k).startswith("log10_"))]
    if isinstance(value, list):
        if len(value) > RAW_LIST and all(isinstance(v, (int, float)) for v in value):
            return []
        return [x for v in value for x in _numbers(v, log10)]
    return []


def json_numbers(folder: Path) -> list[float]:
    """The absolute values of every number in every JSON under ``folder``, sorted."""
    values: list[float] = []
    for path in sorted(folder.rglob("*.json")):
        values += _numbers(json.loads(path.read_text()))
    return sorted(values)


def strip_code(text: str) -> list[tuple[int, str]]:
    """The lines of ``text`` (numbered from 1) with fenced blocks and inline code spans removed."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, re.sub(r"`[^`]*`", "", line)))
    return lines


def printed_numbers(line: str) -> list[tuple[str, float, float, float]]:
    """``(text, value, half a unit of its last digit, power of ten)`` of each checked number on a line."""
    quoted = {q for m in QUOTED.finditer(line) for q in m.group(1).split()}
    line = re.sub(r"<!--.*?-->", "", line)
    line = re.sub(r"\d+(?:\.\d+){2,}", "", line)  # version numbers
    # A unit after a slash-separated group ("9.36 / 8.09 ms", "0.50 / 0.31 %") applies to each of its numbers.
    group_unit = {}
    for g in GROUP.finditer(line):
        for m in NUMBER.finditer(g.group(1)):
            group_unit[g.start(1) + m.start()] = g.group(2)
    found = []
    for m in NUMBER.finditer(line):
        text, unit = m.group(1), (m.group(4) or group_unit.get(m.start(), "")).strip()
        exponent = m.group(2).translate(SUPERSCRIPT) if m.group(2) else m.group(3)
        if text.count(".") > 1 or text in quoted:
            continue
        decimals = len(text.split(".")[1])
        power = 10.0 ** int(exponent) if exponent else 1.0
        scale = {"%": 100.0, "ms": 1000.0}.get(unit, 1.0)
        found.append((m.group(0).strip() + ("" if m.group(4) or not unit else f" [{unit}]"), float(text),
                      0.5 * 10.0 ** -decimals, power / scale))
    return found


def appears(values: list[float], value: float, half: float, power: float, unit_scaled: bool) -> bool:
    """Whether some JSON value rounds to ``value`` at its printed precision (optionally after the unit's scale)."""
    candidates = [power] + ([1.0] if unit_scaled else [])
    for factor in candidates:
        low, high = (value - half * (1 + 1e-9)) * factor, (value + half * (1 + 1e-9)) * factor
        i = bisect.bisect_left(values, min(low, high))
        if i < len(values) and values[i] <= max(low, high):
            return True
    return False


Chunk = tuple[list[tuple[int, str]], list[Path]]


def paragraphs(lines: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """``lines`` split at blank lines (a table or a bullet list is one paragraph)."""
    out: list[list[tuple[int, str]]] = [[]]
    for number, line in lines:
        if line.strip():
            out[-1].append((number, line))
        elif out[-1]:
            out.append([])
    return [p for p in out if p]


def pages() -> list[tuple[str, list[Chunk]]]:
    """``(name, [(lines, result folders)])`` for every docs page and every README Results subsection.

    A docs page's paragraph is checked against the page's own folder and the folders of the pages
    that paragraph links to. A README subsection is checked against the folders of the pages the
    subsection links to, except that a table row with links of its own is checked against those only.
    """
    out = []
    for page in sorted(DOCS.glob("*.md")):
        chunks = []
        for paragraph in paragraphs(strip_code(page.read_text())):
            linked = {m.group(1) for _, line in paragraph for m in PAGE_LINK.finditer(line)} - {page.stem}
            chunks.append((paragraph, [DOCS / page.stem] + sorted(DOCS / n for n in linked if (DOCS / n).is_dir())))
        out.append((f"docs/{page.name}", chunks))
    readme = strip_code((ROOT / "README.md").read_text())
    section: list[tuple[int, str]] | None = None
    subsections: list[list[tuple[int, str]]] = []
    for number, line in readme:
        if line.startswith("## "):
            section = [] if line.strip() == "## Results" else None
            if section is not None:
                subsections.append(section)
            continue
        if section is None:
            continue
        if line.startswith("### "):
            section = []
            subsections.append(section)
        section.append((number, line))
    for lines in subsections:
        folders = sorted({DOCS / m.group(2) for _, line in lines for m in LINK.finditer(line)})
        chunks = []
        for number, line in lines:
            own = sorted({DOCS / m.group(2) for m in LINK.finditer(line)})
            chunks.append(([(number, line)], own if line.startswith("|") and own else folders))
        title = lines[0][1] if lines else ""
        out.append((f"README.md ({title.strip('# ')[:50]})", chunks))
    return out


def unmatched(lines: list[tuple[int, str]], folders: list[Path]) -> list[str]:
    values = sorted(v for folder in folders for v in json_numbers(folder))
    missing = []
    for number, line in lines:
        for text, value, half, power in printed_numbers(line):
            unit_scaled = text.endswith(("%", "ms", "[%]", "[ms]"))
            if not appears(values, value, half, power, unit_scaled):
                missing.append(f"line {number}: {text}")
    return missing


def unmatched_page(chunks: list[Chunk]) -> list[str]:
    return [m for lines, folders in chunks for m in unmatched(lines, folders)]


PAGES = pages()


def test_readme_has_results_sections() -> None:
    readme = [chunks for name, chunks in PAGES if name.startswith("README")]
    assert len(readme) >= 5
    assert sum(any(folders for _, folders in chunks) for chunks in readme) >= 5  # each subsection links its page
    assert len([name for name, _ in PAGES if name.startswith("docs/")]) >= 12


@pytest.mark.parametrize("name, chunks", PAGES, ids=[p[0] for p in PAGES])
def test_every_number_is_in_the_page_json(name: str, chunks: list[Chunk]) -> None:
    missing = unmatched_page(chunks)
    assert not missing, (
        f"{name}: numbers in no JSON of the page (or of the pages the paragraph links to) to their printed "
        f"precision (write them from the script, mark a paper's with <!-- quoted: ... -->, or drop them):\n  "
        + "\n  ".join(missing)
    )


def test_the_checker_catches_a_changed_digit() -> None:
    """Break a page on purpose: one digit of a published number changed fails, the original passes."""
    _, chunks = next(p for p in PAGES if p[0] == "docs/gmm_three_ways.md")
    assert not unmatched_page(chunks)
    (number, line, folders), = [(n, text, f) for lines, f in chunks for n, text in lines
                                if "| true parameters | **−3.4085** |" in text]
    assert unmatched([(number, line.replace("3.4085", "3.4095"))], folders) == [f"line {number}: 3.4095"]
    # A number rounded twice (88.549 printed as 88.6, the old README's β = 2 distortion) fails.
    assert unmatched([(1, "distortion 88.6")], [DOCS / "beta_vae"]) == ["line 1: 88.6"]
    assert not unmatched([(1, "distortion 88.5")], [DOCS / "beta_vae"])


def test_marker_and_exemptions() -> None:
    assert printed_numbers("paper 86.76 <!-- quoted: 86.76 -->") == []
    assert [t for t, *_ in printed_numbers("paper 86.76, ours 91.10 <!-- quoted: 86.76 -->")] == ["91.10"]
    assert [t for t, *_ in printed_numbers("torch 2.14.1, ratio 0.85")] == ["0.85"]
    (_, value, half, power), = printed_numbers("6.6·10³² at d=64")
    assert (value, half, power) == (6.6, 0.05, 1e32)
    (_, value, half, power), = printed_numbers("variance 4.25e5")
    assert (value, half, power) == (4.25, 0.005, 1e5)
    assert [t for t, *_ in printed_numbers("3.32 / 3.57 ms")] == ["3.32 [ms]", "3.57 ms"]
    assert strip_code("a `--lr 1.5` b")[0][1] == "a  b"
    assert strip_code("```\nx = 1.5\n```\nafter 2.5") == [(4, "after 2.5")]
    assert not appears([88.5499], 88.6, 0.05, 1.0, False)
    assert appears([88.5501], 88.6, 0.05, 1.0, False)
    assert appears([0.00332], 3.32, 0.005, 1e-3, True) and not appears([0.00332], 3.32, 0.005, 1.0, False)
    assert _numbers({"log10_relvar": 2.0, "n": 3}) == [2.0, 100.0, 3.0]
    assert _numbers({"per_point": list(range(RAW_LIST + 1))}) == []
