"""Recipe schema: good recipes load, bad ones fail with one line naming key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ftedge.errors import FtedgeError
from ftedge.recipe import Recipe, apply_overrides, explain, load_recipe

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, raw: dict) -> Path:
    (tmp_path / "d.csv").write_text("text,category\nhi,a\nyo,b\n")
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _raw(**extra) -> dict:
    raw = {"name": "t", "data": {"train": "d.csv", "label_field": "category"}}
    raw.update(extra)
    return raw


def test_default_recipe_is_valid() -> None:
    r = load_recipe(REPO / "recipes" / "smollm2-banking77.yaml")
    assert r.name == "smollm2-banking77"
    assert r.data.train.is_absolute() and r.data.train.is_file()
    assert r.train.method == "qlora" and r.quant.bits == 4


def test_all_shipped_recipes_validate() -> None:
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        Recipe.model_validate(raw)  # schema only: hub recipes' data may need a download
        assert path.read_text().startswith("#"), f"{path.name} must start with a comment giving the command"


def test_every_shipped_recipe_validates_on_a_fresh_clone(tmp_path: Path) -> None:
    """`ftedge validate` on each recipe of a fresh clone (recipes/ and data/, no runs/): valid. The DPO recipe's inputs (an SFT
    run, its preference set) are listed as todo with the commands that make them, and its header says to run those first."""
    import shutil

    from click.testing import CliRunner

    from ftedge.cli import main

    clone = tmp_path / "clone"
    for folder in ("recipes", "data"):
        shutil.copytree(REPO / folder, clone / folder)
    recipes = sorted((clone / "recipes").glob("*.yaml"))
    assert len(recipes) == len(list((REPO / "recipes").glob("*.yaml"))) >= 2
    made = 0
    for path in recipes:
        res = CliRunner().invoke(main, ["validate", str(path)])
        assert res.exit_code == 0, f"{path.name}: {res.output}"
        assert res.output.strip().splitlines()[-1].startswith(f"{path}: valid"), res.output
        recipe = load_recipe(path, check_files=False)
        todo = [line for line in res.output.splitlines() if line.startswith("todo")]
        assert len(todo) == len(recipe.made_by), res.output  # on a fresh clone nothing a command makes exists yet
        header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
        for key, command in recipe.made_by.items():
            assert any(line.startswith(f"todo  {key}: ") and line.endswith(f"`{command}` makes it") for line in todo), res.output
            assert command in header, f"{path.name}: the header comment must give `{command}`"
        made += len(recipe.made_by)
    assert made >= 4  # the DPO recipe: its SFT run and three preference files


def test_inputs_made_by_a_command(tmp_path: Path) -> None:
    """A missing input named in made_by: training refuses it naming the command; validate lists it as todo."""
    from ftedge.validate import TODO, preflight

    raw = _raw(made_by={"data.val": "python make_val.py"})
    raw["data"]["val"] = "val.csv"
    path = _write(tmp_path, raw)
    with pytest.raises(FtedgeError, match=r"data.val: .*val.csv is not made yet \(fix: run `python make_val.py` first"):
        load_recipe(path)
    with pytest.raises(FtedgeError, match="not made yet"):
        preflight(path)  # what `ftedge train` / `ftedge run` check first
    lines = preflight(path, pending_ok=True)
    assert f"{TODO}data.val: {tmp_path.resolve() / 'val.csv'} not made yet: `python make_val.py` makes it" in lines
    assert not any(" train rows, " in line for line in lines)  # the data is checked once it is all there
    (tmp_path / "val.csv").write_text("text,category\nhey,a\n")
    lines = preflight(path, pending_ok=True)
    assert not [line for line in lines if line.startswith(TODO)] and any(" train rows, val val.csv (1)" in line for line in lines)
    with pytest.raises(FtedgeError, match="made_by: data.trian is not an input a command makes"):
        load_recipe(_write(tmp_path, _raw(made_by={"data.trian": "x"})))
    with pytest.raises(FtedgeError, match="train.init_from: .*no-such-run not found"):  # without made_by: a wrong path
        preflight(_write(tmp_path, _raw(train={"init_from": "no-such-run", "method": "lora"})))


def test_relative_data_path_resolves_against_recipe_folder(tmp_path: Path) -> None:
    r = load_recipe(_write(tmp_path, _raw()))
    assert r.data.train == (tmp_path / "d.csv").resolve()


def test_overrides_dotted_and_typed(tmp_path: Path) -> None:
    r = load_recipe(
        _write(tmp_path, _raw()), ["train.max_steps=20", "train.lr=1e-4", "train.packing=false", "lora.target_modules=[q_proj, v_proj]"]
    )
    assert r.train.max_steps == 20 and r.train.lr == pytest.approx(1e-4) and r.train.packing is False
    assert r.lora.target_modules == ["q_proj", "v_proj"]


def test_override_of_data_path(tmp_path: Path) -> None:
    other = tmp_path / "other.csv"
    other.write_text("text,category\na,b\n")
    r = load_recipe(_write(tmp_path, _raw()), [f"data.train={other}"])
    assert r.data.train == other


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda raw: raw.update(bogus=1), "unknown key 'bogus'"),
        (lambda raw: raw["data"].update(colour="red"), "unknown key 'data.colour'"),
        (lambda raw: raw.update(train={"max_steps": "many"}), "train.max_steps"),
        (lambda raw: raw["data"].update(format="tsv"), "data.format"),
        (lambda raw: raw.update(eval={"task": "bleu"}), "eval.task"),
        (lambda raw: raw.pop("name"), "missing required key 'name'"),
        (lambda raw: raw.update(train={"method": "qlora"}, quant={"bits": 16}), "quant.bits=4"),
    ],
)
def test_bad_recipes_give_one_line(tmp_path: Path, mutate, needle: str) -> None:
    raw = _raw()
    mutate(raw)
    with pytest.raises(FtedgeError) as exc:
        load_recipe(_write(tmp_path, raw))
    msg = exc.value.one_line()
    assert needle in msg
    assert "\n" not in msg
    assert str(tmp_path / "r.yaml") in msg


def test_missing_data_file_names_key_and_fix(tmp_path: Path) -> None:
    raw = _raw()
    raw["data"]["train"] = "nope.csv"
    with pytest.raises(FtedgeError, match=r"data\.train: file .*nope\.csv not found.*-o data\.train=PATH"):
        load_recipe(_write(tmp_path, raw))


def test_missing_recipe_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(FtedgeError, match="not found"):
        load_recipe(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(FtedgeError, match=r"bad\.yaml:\d+: not valid YAML"):
        load_recipe(bad)


def test_bad_override_syntax() -> None:
    with pytest.raises(FtedgeError, match="KEY=VALUE"):
        apply_overrides({}, ["train.max_steps"])
    with pytest.raises(FtedgeError, match="not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_every_field_is_described() -> None:
    rows = explain()
    assert {"data.train", "train.max_steps", "adapter.r", "quant.type", "eval.task", "export.target"} <= {r[0] for r in rows}
    assert all(desc for _, _, _, desc in rows)
