"""Generate the recipe and target reference (docs/reference.md) from the schemas, so it cannot drift.

``python -m ftedge.docs`` rewrites the block between the markers in docs/reference.md;
``python -m ftedge.docs --check`` fails when docs/reference.md is stale (a test runs this).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel

from ftedge.recipe import Recipe, explain
from ftedge.targets import Target

BEGIN = "<!-- BEGIN GENERATED REFERENCE (python -m ftedge.docs) -->"
END = "<!-- END GENERATED REFERENCE -->"
REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "reference.md"


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


def render(page: str) -> str:
    if BEGIN not in page or END not in page:
        raise SystemExit(f"{REFERENCE.name} has no generated-reference markers")
    head, _, rest = page.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + reference() + tail


def main(argv: list[str]) -> int:
    path = REFERENCE
    text = path.read_text(encoding="utf-8")
    new = render(text)
    if "--check" in argv:
        if new != text:
            sys.stderr.write("docs/reference.md is stale: run `python -m ftedge.docs`\n")
            return 1
        return 0
    path.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
