"""The documentation: generated pages match their generator, README's Python snippet compiles, and the docs speak
of the software only (no sentences about how it was developed: work periods, machines lent, budgets, issues)."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Phrases that tell the history of the work rather than describe the software.
HISTORY = re.compile(
    r"\bsessions?\b|\bissue\s*#?\d|\(issue\b|\ba later issue\b|\bthe lead\b|\b(?:was|were|not) lent\b|\bwithheld\b"
    r"|\bdevice (?:budget|time)\b|\bbudget (?:was|is) spent\b|\bmade exact this\b",
    re.IGNORECASE,
)


def _scanned():
    docs = [ROOT / "README.md", ROOT / "examples" / "README.md"]
    docs += sorted((ROOT / "docs").rglob("*.md"))
    code = [p for d in ("helix_compile", "tools", "examples", "tests/gpu") for p in sorted((ROOT / d).rglob("*.py"))]
    return docs + code + [ROOT / "pyproject.toml"]


def test_docs_speak_of_the_software_only():
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()[:100]}" for p in _scanned()
            for n, line in enumerate(p.read_text().splitlines(), 1) if HISTORY.search(line)]
    assert not hits, "sentences about the work's history, not the software:\n" + "\n".join(hits)


def test_coverage_page_is_generated_from_its_json():
    spec = importlib.util.spec_from_file_location("coverage_tool", ROOT / "tools" / "coverage.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    results, runs = tool.load((ROOT / "docs" / "coverage.json").read_text())
    page = tool.render(results, tool.worlds_of(results), runs[-1]["steps"], runs) + "\n"
    assert page == (ROOT / "docs" / "coverage.md").read_text(), (
        "docs/coverage.md differs from what tools/coverage.py renders from docs/coverage.json: "
        "run `python tools/coverage.py --render`")


def test_readme_python_quickstart_compiles():
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python quickstart\n", 1)[-1].split("\n## ", 1)[0]
    block = re.search(r"^```python\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    assert "\n## Python quickstart\n" in text and block, "README.md: no ```python block under '## Python quickstart'"
    compile(block.group(1), "README.md (Python quickstart)", "exec")
