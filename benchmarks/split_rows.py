"""Write the rows of one split of a recipe's data (train, val or test) as a text,label CSV.

The splits are ftedge's own (``ftedge.data.load_splits``: fixed seed, each input in one split), so the test
rows written here are the ones no stage trains, validates, gates or calibrates on. Used to check a shipped
GGUF against an independent scorer on rows it has never seen:

    .venv/bin/python benchmarks/split_rows.py recipes/smollm2-banking77.yaml --split test --out /tmp/unseen.csv
    .venv/bin/python benchmarks/independent_scorer.py runs/<run>/ship/*.gguf /tmp/unseen.csv \\
        --system-prompt "Give the banking intent label." --label-field category

Only ``text_label`` recipes (one user turn and a label) are written.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--split", choices=["train", "val", "test"], default="test")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    from ftedge.data.splits import load_splits, prompt_text
    from ftedge.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.override)
    if recipe.data.format != "text_label":
        print(f"{args.recipe}: data.format is {recipe.data.format}; only text_label rows are written", file=sys.stderr)
        return 2
    rows = getattr(load_splits(recipe), args.split)
    label = recipe.data.label_field
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([recipe.data.text_field, label])
        writer.writerows([prompt_text(ex), ex.target] for ex in rows)
    print(f"{len(rows)} {args.split} rows of {args.recipe} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
