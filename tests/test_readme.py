"""Every ```python block of README.md runs, as written up to the substitutions below.

**What runs.** The ```python blocks of ``README.md``, and of every ``docs/*.md`` page that holds the
line ``<!-- test-snippets -->`` (results pages quote code that is not meant to run, so they opt in).
A file's blocks run in order, in one namespace (a block may use what an earlier one defined), in a
fresh temporary working directory, with Pyro's param store cleared and the seed fixed first
(conftest.py). A block whose nearest non-blank line above it starts with ``<!-- no-test`` is
skipped; the README says why next to it (``<!-- no-test: why -->`` keeps the reason in the marker).
New sections are picked up without any change here.

**Substitutions** (``SUBSTITUTIONS``), so that the README keeps the real numbers and the test stays
under ~30 s on one CPU thread (about 2 s for today's README). They shrink sizes only:

==============================  ==============================================  =====================
in the snippet                  becomes                                         why
==============================  ==============================================  =====================
``load_mnist(...)``             ``_readme_subset(load_mnist(...))``: the first  an epoch of 60,000
                                ``NUM_TRAIN`` training and ``NUM_TEST`` test    points takes minutes
                                points
``"../shared/data"``            the value of ``$PYROVAE_DATA`` (the test skips  where the tests' MNIST
                                without it, as every MNIST test does, and       is
                                fails in CI)
``epochs=N``                    ``epochs=min(N, MAX_EPOCHS)``                   time
``num_samples=N``               ``num_samples=min(N, MAX_SAMPLES)``             K = 5000 draws per
                                                                                point take minutes
``num_train=N``/``num_test=N``  ``min(N, NUM_TRAIN)``/``min(N, NUM_TEST)``      time
==============================  ==============================================  =====================

A ``load_mnist`` call with parentheses inside its arguments is not rewritten (the pattern does
not nest): pass the folder as a plain string, or extend the pattern.
"""

from __future__ import annotations

import dataclasses
import os
import re
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS_MARKER = "<!-- test-snippets -->"
SKIP_MARKER = "<!-- no-test"

NUM_TRAIN, NUM_TEST, MAX_EPOCHS, MAX_SAMPLES = 1000, 500, 2, 20


def _capped(name: str, cap: int) -> tuple[str, Callable[[re.Match[str]], str]]:
    return rf"\b{name}\s*=\s*(\d[\d_]*)", lambda m: f"{name}={min(int(m.group(1)), cap)}"


#: (pattern, replacement) applied in this order to every block before it runs; see the table above
#: (load_mnist first: its pattern does not cross parentheses).
SUBSTITUTIONS: list[tuple[str, Callable[[re.Match[str]], str]]] = [
    (r"(?<![\w.])((?:\w+\.)?load_mnist\([^()]*\))", lambda m: f"_readme_subset({m.group(1)})"),
    (r"""(["'])\.\./shared/data\1""", lambda m: repr(os.environ["PYROVAE_DATA"])),
    _capped("epochs", MAX_EPOCHS),
    _capped("num_samples", MAX_SAMPLES),
    _capped("num_train", NUM_TRAIN),
    _capped("num_test", NUM_TEST),
]


@dataclass
class Block:
    path: Path
    line: int  # of the first code line, 1-based
    code: str
    skipped: bool
    heading: str  # the nearest Markdown heading above the block


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a Markdown file, in order (indented fences, as in lists, too)."""
    lines = path.read_text().splitlines()
    blocks, heading, i = [], "", 0
    while i < len(lines):
        stripped = lines[i].strip()
        if re.match(r"#{1,6}\s", lines[i]):
            heading = stripped.lstrip("#").strip()
        elif stripped.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise ValueError(f"{path.name}:{i + 1}: a ``` block that is never closed")
            if stripped == "```python":
                above = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
                code = textwrap.dedent("\n".join(lines[i + 1 : end]))
                blocks.append(Block(path, i + 2, code, above.startswith(SKIP_MARKER), heading))
            i = end  # other fences (bash, text) are stepped over whole: their "# ..." is no heading
        i += 1
    return blocks


def substitute(code: str) -> str:
    for pattern, replacement in SUBSTITUTIONS:
        code = re.sub(pattern, replacement, code)
    return code


def _readme_subset(data):  # type: ignore[no-untyped-def]
    """The first NUM_TRAIN training and NUM_TEST test points of a data set (labels alike)."""
    def head(tensor, n):  # type: ignore[no-untyped-def]
        return None if tensor is None else tensor[:n]

    return dataclasses.replace(
        data, train=data.train[:NUM_TRAIN], test=data.test[:NUM_TEST],
        train_labels=head(data.train_labels, NUM_TRAIN), test_labels=head(data.test_labels, NUM_TEST),
    )


def snippet_files() -> list[Path]:
    docs = sorted(p for p in (ROOT / "docs").glob("*.md") if DOCS_MARKER in p.read_text().splitlines())
    return [ROOT / "README.md", *docs]


@pytest.mark.parametrize("path", snippet_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mnist_root: Path) -> None:
    monkeypatch.setenv("PYROVAE_DATA", str(mnist_root))
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(path)
    runnable = [block for block in blocks if not block.skipped]
    assert runnable, f"{path.name} has no ```python block to run"
    namespace: dict[str, object] = {"__name__": "__snippets__", "_readme_subset": _readme_subset}
    for block in runnable:
        code = substitute(block.code)
        # Padded so that tracebacks give the Markdown file's own line numbers.
        compiled = compile("\n" * (block.line - 1) + code, str(block.path), "exec")
        error = None
        try:
            exec(compiled, namespace)
        except (Exception, SystemExit):
            error = traceback.format_exc()
        if error is not None:
            pytest.fail(
                f"{path.name}:{block.line} (section {block.heading!r}): the ```python block failed.\n"
                f"--- as run, after the substitutions of tests/test_readme.py ---\n{code}\n"
                f"--- error ---\n{error}",
                pytrace=False,
            )


def test_the_api_in_one_screen_is_run() -> None:
    """The README's "The API in one screen" block is one of the blocks that run."""
    blocks = [b for b in python_blocks(ROOT / "README.md") if b.heading == "The API in one screen"]
    assert len(blocks) == 1 and not blocks[0].skipped
    assert "fit(" in blocks[0].code and "evaluate_dataset(" in blocks[0].code


def test_blocks_markers_and_substitutions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parser and the substitution table on a made-up page."""
    monkeypatch.setenv("PYROVAE_DATA", "/data/here")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n```python\nx = 1\n```\n\n## Later\n\n<!-- no-test: needs a GPU -->\n```python\n"
        "y = x\n```\n\n- a list item:\n\n  ```python\n  z = 2\n  ```\n\n```bash\n# not a heading\n```\n"
    )
    blocks = python_blocks(page)
    assert [(b.line, b.code, b.skipped, b.heading) for b in blocks] == [
        (4, "x = 1", False, "Title"), (11, "y = x", True, "Later"), (17, "z = 2", False, "Later"),
    ]
    code = 'data = load_mnist("../shared/data")\nfit(m, g, data, o, epochs=10, batch_size=100)\n' \
           "log_likelihood(m, g, x, i, 100, num_samples=5000)\nTrainConfig(num_train=60_000, num_test=100, epochs=1)"
    assert substitute(code) == (
        "data = _readme_subset(load_mnist('/data/here'))\n"
        f"fit(m, g, data, o, epochs={MAX_EPOCHS}, batch_size=100)\n"
        f"log_likelihood(m, g, x, i, 100, num_samples={MAX_SAMPLES})\n"
        f"TrainConfig(num_train={NUM_TRAIN}, num_test=100, epochs=1)"
    )
