"""The package's shape: no import circles, no private names taken across modules, and docs/architecture.md names
only files that exist.

The import graph is read from the source with ``ast`` (every import statement, at module level or inside a
function: a function-level import is a circle all the same, only deferred), so it needs no import of the package.
"""

import ast
import re
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "helix_compile"

# Private imports this test tolerates, each (importing module, imported module, name). Every entry must still be in
# the source (a stale one fails): convert.py takes loading's checkpoint-file lister until the command modules move.
TOLERATED_PRIVATE = set()


def modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``) for every ``.py`` file under ``root/package``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        init = parts[-1] == "__init__"
        out[".".join(parts[:-1] if init else parts)] = (path, init)
    return out


def imports(root: Path, package: str):
    """(graph, private): the module import graph of ``package`` (an edge a -> b: a imports b), and every
    (importer, module, name) of a ``from module import _name`` across two modules of the package."""
    found = modules(root, package)
    graph, private = nx.DiGraph(), []
    for name, (path, init) in found.items():
        graph.add_node(name)
        base = name if init else name.rpartition(".")[0]  # the package relative imports start from
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = alias.name
                    while target and target not in found:  # import a.b.c: the deepest module of the package
                        target = target.rpartition(".")[0]
                    if target:
                        graph.add_edge(name, target)
                continue
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                parts = base.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                source = ".".join(parts + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source not in found:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in found:  # from package import module
                    graph.add_edge(name, sub)
                    continue
                graph.add_edge(name, source)
                if alias.name.startswith("_") and not alias.name.startswith("__") and source != name:
                    private.append((name, source, alias.name))
    graph.remove_edges_from([(a, b) for a, b in graph.edges if a == b])
    return graph, private


def cycles(graph: nx.DiGraph) -> list[str]:
    """Every import circle, as ``a -> b -> a``, shortest first."""
    found = sorted(nx.simple_cycles(graph), key=lambda c: (len(c), c))
    return [" -> ".join(c[c.index(min(c)):] + c[: c.index(min(c))] + [min(c)]) for c in found]


def test_no_import_circles():
    graph, _ = imports(ROOT, PACKAGE)
    assert graph.number_of_edges() > 50, "the import graph came out nearly empty: the reader is broken"
    found = cycles(graph)
    assert not found, f"{len(found)} import circle(s) in {PACKAGE} (move what both sides need into a lower module):\n" + (
        "\n".join(found[:20]))


def test_no_private_names_imported_across_modules():
    _, private = imports(ROOT, PACKAGE)
    stale = TOLERATED_PRIVATE - set(private)
    assert not stale, f"TOLERATED_PRIVATE lists imports that are gone: {sorted(stale)}; remove them"
    found = [f"{a} imports {name} from {b}" for a, b, name in private if (a, b, name) not in TOLERATED_PRIVATE]
    assert not found, "private names imported across modules (make the name public, or move it to a module both " \
                      "use):\n" + "\n".join(found)


def test_the_checks_catch_a_circle_and_a_private_import(tmp_path):
    """The reader on a made-up package: a circle through a function-level relative import, a private name, and an
    acyclic ``from package import module``."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("from .sub.b import _helper\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def _helper():\n    from ..a import x\n")
    (pkg / "c.py").write_text("import pkg.sub.b\nfrom pkg import a\n")
    graph, private = imports(tmp_path, "pkg")
    assert cycles(graph) == ["pkg.a -> pkg.sub.b -> pkg.a"]
    assert private == [("pkg.a", "pkg.sub.b", "_helper")]
    assert set(graph.successors("pkg.c")) == {"pkg.sub.b", "pkg.a"}


# -- docs/architecture.md -----------------------------------------------------------------------------------------
DOC = ROOT / "docs" / "architecture.md"
_PATH = re.compile(r"`((?:helix_compile|tests|tools|benchmarks|examples|docs|results)/[\w./-]*)`")


def test_architecture_doc_names_only_existing_files():
    text = DOC.read_text()
    named = sorted(set(_PATH.findall(text)))
    assert len(named) > 30, f"{DOC.name} names only {len(named)} repository paths; the reader is broken"
    missing = [p for p in named if not (ROOT / p).exists()]
    assert not missing, f"{DOC.name} names paths that do not exist: {missing}"


def test_architecture_doc_names_every_package():
    """Each package of helix_compile has its place in the drawing (its folder named as ``helix_compile/x/``)."""
    text = DOC.read_text()
    packages = sorted(str(p.parent.relative_to(ROOT)) + "/" for p in (ROOT / PACKAGE).rglob("__init__.py")
                      if p.parent != ROOT / PACKAGE)
    unnamed = [p for p in packages if f"`{p}`" not in text]
    assert not unnamed, f"{DOC.name} does not name the package(s) {unnamed}"


def test_architecture_doc_module_names_exist():
    """Dotted names (``helix_compile.passes.detect``) in the doc name modules or packages that exist."""
    found = modules(ROOT, PACKAGE)
    named = set(re.findall(r"`(helix_compile\.[\w.]+)`", DOC.read_text()))
    missing = sorted(n for n in named if n not in found)
    assert not missing, f"{DOC.name} names modules that do not exist: {missing}"
