"""Layout measures for docs/architecture.md: largest modules, longest functions, and the
places outside the storage layouts that branch on dense against top-k.

    python tests/layout_measure.py CHECKOUT
"""

import ast
import re
import sys
from pathlib import Path

BRANCH = re.compile(
    r"\btop_k is (not )?None\b|if [a-z_.]*top_k\b|top_k else|\.top_k\)? else"  # before
    r"|storage\[\"kind\"\] ==|storage\[\"k\"\] is|isinstance\([^)]*(Dense|TopK)"  # after
)


def main(checkout: Path) -> None:
    root = checkout / "pipeline"
    files = sorted(root.rglob("*.py"))
    sizes = sorted(((len(p.read_text().splitlines()), p) for p in files), reverse=True)
    print("largest modules:", [(n, str(p.relative_to(checkout))) for n, p in sizes[:4]])
    functions = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                functions.append((length, f"{path.relative_to(checkout)}:{node.name}"))
    print("longest functions:", sorted(functions, reverse=True)[:8])
    hits = [
        (str(path.relative_to(checkout)), number)
        for path in files
        if path.name != "layout.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if BRANCH.search(line)
    ]
    print(f"dense/top-k branches outside cache/layout.py: {len(hits)} in "
          f"{len({file for file, _ in hits})} files")  # fmt: skip
    for hit in hits:
        print("  ", *hit)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
