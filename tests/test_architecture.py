"""docs/ARCHITECTURE.md opens with the package tree: every module of src/distillery is listed there, none is missing."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_tree_lists_every_module():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    tree = doc.split("```text", 1)[1].split("```", 1)[0]
    listed, package = set(), ""
    for line in tree.splitlines()[2:]:
        if re.match(r"^  \S+/$", line):
            package = line.strip()
        elif line.strip():
            listed.add(package + line.split()[0])
    src = ROOT / "src" / "distillery"
    modules = {str(p.relative_to(src)) for p in src.rglob("*.py")}
    assert listed == modules, (sorted(modules - listed), sorted(listed - modules))


def _imports() -> dict[str, list[tuple[str, str]]]:
    """Each module of distillery -> the (module, name) pairs it imports from distillery, lazy imports included."""
    src = ROOT / "src"
    files = {".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (src / "distillery").rglob("*.py")}
    found = {}
    for mod, path in files.items():
        pairs = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                parts = mod.split(".")[: len(mod.split(".")) - (node.level - (path.name == "__init__.py"))]
                base = ".".join(parts + [node.module or ""]).strip(".") if node.level else node.module or ""
                for alias in node.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    if target.startswith("distillery"):
                        pairs.append((target, alias.name))
            elif isinstance(node, ast.Import):
                pairs += [(a.name, "") for a in node.names if a.name in files]
        found[mod] = [(t, n) for t, n in pairs if t != mod]
    return found


def test_no_private_names_cross_modules():
    bad = [(mod, t, n) for mod, pairs in _imports().items() for t, n in pairs
           if n.startswith("_") and not n.startswith("__")]
    assert not bad


def test_no_import_circles():
    graph = {mod: {t for t, _ in pairs} for mod, pairs in _imports().items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo += graph.get(m, ())
        return False

    circles = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if reaches(b, a)})
    assert not circles
