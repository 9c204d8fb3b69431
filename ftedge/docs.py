"""Generate the README's recipe and target reference from the schemas, so it cannot drift.

``python -m ftedge.docs`` rewrites the block between the markers in README.md;
``python -m ftedge.docs --check`` fails when README.md is stale (a test runs this).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel

from ftedge.recipe import Recipe, explain
from ftedge.targets import Target

BEGIN = "<!-- BEGIN GENERATED REFERENCE (python -m ftedge.docs) -->"
END = "<!-- END GENERATED REFERENCE -->"


def _table(model: type[BaseModel]) -> str:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, type_name, default, desc in explain(model):
        if type_name == "section":
            lines.append(f"| **{key}** | section | | {desc} |")
        else:
            lines.append(f"| `{key}` | {type_name.replace('|', 'or')} | {default.replace('|', 'or')} | {desc.replace('|', '/')} |")
    return "\n".join(lines)


def reference() -> str:
    return "\n\n".join([BEGIN, "### Recipe keys", _table(Recipe), "### Target profile keys (`export/*.yaml`)", _table(Target), END])


def render(readme: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit("README.md has no generated-reference markers")
    head, _, rest = readme.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + reference() + tail


def main(argv: list[str]) -> int:
    path = Path(__file__).resolve().parent.parent / "README.md"
    text = path.read_text(encoding="utf-8")
    new = render(text)
    if "--check" in argv:
        if new != text:
            sys.stderr.write("README.md reference is stale: run `python -m ftedge.docs`\n")
            return 1
        return 0
    path.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
