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
