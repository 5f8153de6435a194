"""docs/ARCHITECTURE.md opens with the package tree: every module of src/distillery is listed there, none is missing."""

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
