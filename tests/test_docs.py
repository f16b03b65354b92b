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
    docs = [ROOT / "README.md", ROOT / "examples" / "README.md", ROOT / "results" / "README.md"]
    docs += sorted((ROOT / "docs").rglob("*.md"))
    code = [p for d in ("helix_compile", "tools", "benchmarks", "examples", "tests/gpu")
            for p in sorted((ROOT / d).rglob("*.py"))]
    return docs + code + [ROOT / "pyproject.toml"]


def test_docs_speak_of_the_software_only():
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()[:100]}" for p in _scanned()
            for n, line in enumerate(p.read_text().splitlines(), 1) if HISTORY.search(line)]
    assert not hits, "sentences about the work's history, not the software:\n" + "\n".join(hits)


# A repository path as the docs and the code cite it, from the repository root: a file under one of the top-level
# folders (with its extension), or a folder (with its trailing slash).
_TOP = r"(?:helix_compile|tests|tools|benchmarks|examples|docs|results)"
_FILE = r"[\w-][\w.-]*\.(?:json|log|png|md|py|txt|html)\b"
CITED = re.compile(rf"(?<![\w./-]){_TOP}/(?:[\w-][\w.-]*/)*(?:{_FILE}|(?=[`'\s),;:]))")
# A Markdown link or image to a file beside the page: ](target), the target relative to the page.
LINK = re.compile(r"\]\((?!https?:|mailto:|#)([^)\s#]+)(?:#[^)]*)?\)")


def cited_paths(text: str) -> set[str]:
    return set(CITED.findall(text))


# Test modules whose made-up paths exercise the readers of paths.
READERS = {"tests/test_docs.py", "tests/test_architecture.py"}


def _citing():
    docs = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md", ROOT / "examples" / "README.md",
                                                    ROOT / "results" / "README.md"]
    code = [p for d in ("helix_compile", "tools", "benchmarks", "examples", "tests")
            for p in sorted((ROOT / d).rglob("*.py")) if str(p.relative_to(ROOT)) not in READERS]
    return docs, code


def test_every_cited_path_exists():
    """Every repository path the docs and the code's comments cite (``results/perf/x.json``, ``docs/perf.md``,
    ``benchmarks/attention.py``), and every relative link of a page, names a file or folder that exists."""
    docs, code = _citing()
    missing, seen = [], 0
    for path in docs + code:
        text = path.read_text()
        for cited in sorted(cited_paths(text)):
            seen += 1
            if not (ROOT / cited).exists():
                missing.append(f"{path.relative_to(ROOT)}: {cited}")
        if path.suffix == ".md":
            for target in sorted(set(LINK.findall(text))):
                seen += 1
                if not (path.parent / target).exists():
                    missing.append(f"{path.relative_to(ROOT)}: link ({target})")
    assert seen > 100, f"only {seen} cited paths found: the reader is broken"
    assert not missing, "cited paths that do not exist (moved or renamed? cite the path from the repository root):\n" \
        + "\n".join(missing)


def test_cited_path_reader():
    text = ("Raw: `results/perf/a-1.json` (see docs/perf.md, `tests/gpu/`); ../results/x.json and "
            "out/results/y.json are not from the root; helix_compile/bench/ and tests/test_docs.py::test_x.")
    assert cited_paths(text) == {"results/perf/a-1.json", "docs/perf.md", "tests/gpu/", "helix_compile/bench/",
                                 "tests/test_docs.py"}
    assert LINK.findall("![plot](perf/a.png) [fit](planner/fit.md#top) [web](https://x.org/a) [here](#anchor)") == [
        "perf/a.png", "planner/fit.md"]


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
