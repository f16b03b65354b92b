"""docs/planner/summary.md and the headline figures docs/planner.md quotes are what `helix plan --paper` produces:
regenerate them (without the PNGs) and fail on any difference."""
import os

from helix_compile.planner.paper import HEADLINE_BEGIN, HEADLINE_END, headline_table, run

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs")


def test_summary_and_planner_md_match_the_code(tmp_path):
    results = run(str(tmp_path), echo=lambda *a: None, plots=False)
    with open(os.path.join(DOCS, "planner", "summary.md")) as f:
        committed = f.read()
    generated = (tmp_path / "summary.md").read_text()
    assert generated == committed, "docs/planner/summary.md is stale: run `helix plan --paper docs/planner`"
    with open(os.path.join(DOCS, "planner.md")) as f:
        doc = f.read()
    quoted = doc[doc.index(HEADLINE_BEGIN):doc.index(HEADLINE_END) + len(HEADLINE_END)]
    assert quoted == headline_table(results), "docs/planner.md's headline table is stale: paste it from summary.md"
