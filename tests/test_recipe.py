"""Recipe schema: bad keys are rejected with their path; overrides; shipped recipes validate."""

import pytest
import yaml

from rnnify.convert import METHODS
from rnnify.errors import RnnifyError
from rnnify.paths import RECIPES_DIR
from rnnify.recipe import apply_overrides, load_recipe, recipe_from_dict

BASE = {
    "model": {"source": "tiny"},
    "conversion": {"method": "lolcats", "options": {"window": 8}},
    "datasets": {"d": {"path": "data.txt"}},
    "stages": [{"type": "attention_transfer", "max_steps": 3}, {"type": "distill", "max_steps": 2, "lr": 1e-4}],
    "output": {"dir": "out/x"},
}


def test_a_good_recipe_resolves_stage_settings():
    r = recipe_from_dict(BASE)
    assert [s.name for s in r.stages] == ["attention_transfer", "distill"]
    assert r.stage_settings(1).lr == 1e-4 and r.stage_settings(0).lr == 1e-3  # the default
    assert str(r.run_dir()) == "out/x.run"


@pytest.mark.parametrize(
    "patch,path",
    [
        ({"outptu": {}}, "outptu: unknown key"),
        ({"model": {"sorce": "x"}}, "model.sorce: unknown key"),
        ({"datasets": {"d": {"path": "a", "colum": "x"}}}, "datasets.d.colum: unknown key"),
        ({"eval": {"context_len": 5}}, "eval.context_len: unknown key"),
        ({"train": {"lr": "fast"}}, "train.lr:"),
        ({"stages": [{"type": "distil", "max_steps": 1}]}, "stages.0.type: unknown stage type 'distil'"),
        ({"stages": [{"type": "distill", "max_step": 1}]}, "stage 'distill': unknown stage setting(s) ['max_step']"),
        ({"stages": [{"type": "distill", "max_steps": 1, "lora": {"r": 4}}]},
         "lora is not a distill setting (stages that accept it: finetune)"),
        ({"train": {"temperature": 2.0}, "stages": [{"type": "finetune", "max_steps": 1}]},
         "train.temperature: no stage of this recipe uses it; stages that accept it: distill"),
        ({"train": {"tempreature": 2.0}}, "train.tempreature: unknown key"),
        ({"stages": [{"type": "distill", "max_steps": 1, "lr": -0.1}]}, "stage 'distill': lr: Input should be greater than 0"),
        ({"stages": [{"type": "distill"}]}, "needs max_steps or max_tokens"),
        ({"stages": [{"type": "distill", "max_steps": 1, "data": "other"}]}, "uses data 'other', not in datasets"),
        ({"conversion": {"method": "mamba"}}, f"conversion: unknown method 'mamba'; accepted: {', '.join(sorted(METHODS))}"),
        ({"conversion": {"method": "supra", "options": {"window": 3}}}, "method 'supra' has no setting window"),
        ({"conversion": {"method": "supra", "keep_attention": "auto:1", "select_tokens": 10}},
         "conversion.select_tokens: Input should be greater than or equal to 64"),
    ],
)
def test_bad_recipes_name_the_bad_key(patch, path):
    with pytest.raises(RnnifyError) as e:
        recipe_from_dict({**BASE, **patch}, "r.yaml")
    assert path in str(e.value)
    assert str(e.value).startswith("r.yaml: ")


def test_overrides():
    data = apply_overrides(BASE, ["train.max_steps=7", "stages.distill.lr=3e-4", "stages.0.seq_len=64", "seed=5"])
    r = recipe_from_dict(data)
    assert r.stage_settings(0).max_steps == 7 and r.stage_settings(1).max_steps == 7  # train.X wins over stages
    assert r.stage_settings(1).lr == 3e-4 and r.stage_settings(0).seq_len == 64 and r.seed == 5
    assert BASE["stages"][0]["max_steps"] == 3  # the input is not modified
    with pytest.raises(RnnifyError, match="not key=value"):
        apply_overrides(BASE, ["train.max_steps"])
    with pytest.raises(RnnifyError, match="no list item 'nope'"):
        apply_overrides(BASE, ["stages.nope.lr=1"])


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_validate(path):
    r = load_recipe(str(path))
    assert r.stages and r.eval is not None
    assert yaml.safe_load(path.read_text())["conversion"]["method"] == r.conversion.method


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(RnnifyError, match="shipped: .*quickstart"):
        load_recipe("no-such-recipe")


def test_cli_cp_and_validate(tmp_path, capsys):
    from rnnify.cli import main

    assert main(["cp", "quickstart", str(tmp_path / "my.yaml")]) == 0
    assert main(["validate", str(tmp_path / "my.yaml"), "train.max_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "stage distill (distill): 2 steps" in out
    (tmp_path / "bad.yaml").write_text("model: {source: x}\nconversion: {method: supra}\noutput: {dir: o}\nbogus: 1\n")
    assert main(["validate", str(tmp_path / "bad.yaml")]) == 2
    assert "bogus: unknown key" in capsys.readouterr().err
    assert main(["cp", "quickstart", str(tmp_path / "my.yaml")]) == 2


def test_recipes_are_reachable_as_documented_from_the_repository_root(tmp_path, capsys, monkeypatch):
    """README: `rnnify run recipes/lolcats.yaml`. CI runs the suite in a fresh clone, so this checks a clone's tree."""
    from pathlib import Path

    from rnnify.cli import main

    root = Path(__file__).resolve().parent.parent
    for p in sorted(RECIPES_DIR.glob("*.yaml")):
        assert (root / "recipes" / p.name).is_file(), f"recipes/{p.name} does not resolve in the repository"
    monkeypatch.chdir(root)
    assert main(["validate", "recipes/quickstart.yaml"]) == 0
    monkeypatch.chdir(tmp_path)  # outside a clone: the documented path still finds the shipped recipe
    assert main(["validate", "recipes/lolcats.yaml"]) == 0
    assert "lolcats" in capsys.readouterr().out
