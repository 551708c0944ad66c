"""The README and docs/ speak about the software as it is: their tables are what the published report renders,
every code block in the README runs here or names the tests that exercise it, and no development diary."""

from __future__ import annotations

import json
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


def test_summary_table_puts_forward_and_backward_of_a_dnops_row_side_by_side():
    def row(variant, impl, ms, speedup, peak):
        return {"op": "o", "case": "c", "variant": variant, "impl": impl, "baseline": "ref", "status": "ok",
                "median_ms": ms, "min_ms": ms * 0.9, "max_ms": ms * 1.2, "speedup": speedup,
                "peak_vs_baseline": peak}  # fmt: skip

    rows = [
        row("f32 fwd", "ref", 10.0, 1.0, 1.0),
        row("f32 fwd", "dnops", 2.0, 5.0, 0.25),
        row("f32 fwd", "flex", 20.0, 0.5, 2.0),
        {"op": "o", "case": "c", "variant": "f32 fwd", "impl": "dnops triton", "status": "skipped: no triton kernel"},
        row("f32 fwd+bwd", "ref", 30.0, 1.0, 1.0),
        row("f32 fwd+bwd", "dnops", 10.0, 3.0, 0.5),
        row("step", "ref", 100.0, 1.0, 1.0),
        row("step", "dnops", 50.0, 2.0, None),
    ]
    # a single call timed at two batches: the summary keeps the larger
    rows += [{**row("gen", "dnops", ms, 2.0, None), "case": f"B={b} 3 GT"} for b, ms in ((2, 1.0), (16, 4.0))]
    lines = report.summary_table(rows).splitlines()
    assert lines[2:] == [
        "| o | c | f32 | ref | dnops | **5.00x** 2 ms (1.8-2.4) | **3.00x** 10 ms (9-12) | 25% / 50% |",
        "| o | c | step | ref | dnops | **2.00x** 50 ms (45-60) | - | - |",
        "| o | B=16 3 GT | gen | ref | dnops | **2.00x** 4 ms (3.6-4.8) | - | - |",
    ]


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


@pytest.mark.parametrize("doc", [README, ROOT / "docs" / "dropins.md"], ids=lambda p: p.name)
def test_every_readme_block_runs_or_names_its_tests(doc):
    blocks = _blocks(doc.read_text())
    assert blocks
    for marker, lang, code in blocks:
        assert marker, f"{doc.name} block without <!-- run --> or <!-- tested by: ... -->:\n{code}"
        if marker == "run":
            assert lang == "python"
            continue
        for ref in marker.removeprefix("tested by:").split():
            path, _, name = ref.partition("::")
            assert (ROOT / path).exists(), f"{doc.name} names {path}, which does not exist"
            if name:
                assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), f"no test {ref}"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_readme_quickstart_runs():
    scope: dict = {}
    for marker, _, code in _blocks(README.read_text()):
        if marker == "run":
            exec(compile(code, "README.md", "exec"), scope)  # noqa: S102


def test_gpu_blocks_render_the_latest_committed_gpu_result(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "GPU_RESULTS", tmp_path)
    assert "no dnops kernel has run on a GPU yet" in report.gpu_status()
    assert "No `make gpu-check` result" in report.gpu_block()
    row = {"op": "ms_deform_attn", "case": "enc800", "variant": "fwd", "impl": "cuda", "status": "ok",
           "median_ms": 0.2, "speedup": 40.0, "baseline": "reference", "peak_mb": 21.7}  # fmt: skip
    for day, device in (("2026-01-01", "old"), ("2026-02-01", "NVIDIA H200")):
        (tmp_path / f"{day}-x").mkdir()
        meta = {"device": device, "torch": "2.11.0"}
        (tmp_path / f"{day}-x" / "report.json").write_text(json.dumps({"meta": meta, "rows": [row]}))
    monkeypatch.setattr(report, "ROOT", tmp_path)
    assert report.gpu_status().startswith("**GPU status: run on NVIDIA H200**")
    assert "ms_deform_attn (cuda)" in report.gpu_status()
    block = report.gpu_block()
    assert block.startswith("NVIDIA H200, torch 2.11.0 (`2026-02-01-x`)") and "| ms_deform_attn | enc800 |" in block
