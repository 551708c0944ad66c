"""The README and docs/ speak about the software as it is: their tables are what the published report renders,
every code block in the README runs here or names the tests that exercise it, and no development diary."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks import report

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

# words about how the project was developed, which belong in git history, not in user documentation
DIARY = re.compile(
    r"\bsessions?\s+\d|\bsince session\b|\b(this|last|previous|next) session\b|\bissue\s*#|\bissues?\s+\d+\b|"
    r"\bwork period|\bsprint\b|\bin progress\b|\bTODO\b",
    re.IGNORECASE,
)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"<!-- (run|tested by: [^>]*?) -->\s*$")


def test_generated_blocks_are_what_the_published_report_renders():
    rendered = report.blocks()
    for doc in report.DOCUMENTS:
        text = doc.read_text()
        assert report.rewrite(text, rendered) == text, (
            f"{doc.name}: a generated table differs from docs/results/report.json; run "
            "`python -m benchmarks.report --render` (or --publish after measuring)"
        )
        for name in re.findall(r"<!-- begin ([\w-]+) -->", text):
            assert rendered[name].strip(), f"{doc.name}: block {name} renders empty"


def test_rewrite_replaces_only_the_marked_blocks():
    text = "a\n<!-- begin x -->\nold\n<!-- end x -->\nb\n<!-- begin y -->\n<!-- end y -->\n"
    got = report.rewrite(text, {"x": "new", "y": "| t |"})
    assert got == "a\n<!-- begin x -->\nnew\n<!-- end x -->\nb\n<!-- begin y -->\n| t |\n<!-- end y -->\n"


def test_summary_table_pairs_each_dnops_row_with_its_baseline():
    rows = [
        {"op": "o", "case": "c", "variant": "v", "impl": "ref", "baseline": "ref", "median_ms": 10.0, "min_ms": 9.0,
         "max_ms": 12.0, "speedup": 1.0, "peak_vs_baseline": 1.0},
        {"op": "o", "case": "c", "variant": "v", "impl": "dnops", "baseline": "ref", "median_ms": 2.0, "min_ms": 1.5,
         "max_ms": 2.5, "speedup": 5.0, "peak_vs_baseline": 0.25},
        {"op": "o", "case": "c", "variant": "v", "impl": "flex", "baseline": "ref", "median_ms": 20.0,
         "min_ms": 19.0, "max_ms": 21.0, "speedup": 0.5, "peak_vs_baseline": 2.0},
    ]  # fmt: skip
    lines = report.summary_table(rows).splitlines()
    assert len(lines) == 3 and lines[2] == "| o | c | v | ref | 10 | dnops | 2 (1.5-2.5) | **5.00x** | 25% |"


def test_no_development_diary_in_the_user_docs():
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            found = DIARY.search(line)
            assert not found, f"{doc.relative_to(ROOT)}:{number}: {found.group(0)!r} describes development history"


def _blocks(text: str) -> list[tuple[str, str, str]]:
    """(marker, language, code) of every fenced block; the marker is the HTML comment on the line before it."""
    out = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.match(before)
        out.append((marker.group(1) if marker else "", match.group(1), match.group(2)))
    return out


def test_every_readme_block_runs_or_names_its_tests():
    blocks = _blocks(README.read_text())
    assert blocks
    for marker, lang, code in blocks:
        assert marker, f"README block without <!-- run --> or <!-- tested by: ... -->:\n{code}"
        if marker == "run":
            assert lang == "python"
            continue
        for ref in marker.removeprefix("tested by:").split():
            path, _, name = ref.partition("::")
            assert (ROOT / path).exists(), f"README names {path}, which does not exist"
            if name:
                assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), f"no test {ref}"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_readme_quickstart_runs():
    scope: dict = {}
    for marker, _, code in _blocks(README.read_text()):
        if marker == "run":
            exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
