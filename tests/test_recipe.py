"""Recipe schema: validation errors name the field, overrides are typed, shipped recipes validate."""
from __future__ import annotations

import pytest
import yaml

from compressor.errors import RecipeError
from compressor.app.recipe import (DuplicateKeyError, Recipe, apply_override, dump_recipe, load_recipe,
                               parse_recipe_yaml, recipe_from_dict, shipped_recipes)

from .conftest import REPO, invoke_cli, tiny_recipe


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def error_of(data) -> str:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data, "test.yaml")
    assert info.value.exit_code == 2
    return str(info.value)


def test_repository_ships_recipes():
    assert len(shipped_recipes()) >= 1


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_validates(name):
    recipe = load_recipe(shipped_recipes()[name])
    assert recipe.name
    assert recipe.model.arch is not None
    # the dumped form loads back to the same recipe
    assert recipe_from_dict(yaml.safe_load(dump_recipe(recipe))) == recipe


def test_typo_names_dotted_field_and_suggestion():
    message = error_of(tiny_recipe(prune={"method": "dpm", "dpm": {"stpes": 4}}))
    assert "prune.dpm.stpes: unknown key (did you mean steps?)" in message


def test_top_level_typo_is_named():
    data = tiny_recipe()
    data["finetun"] = {"epochs": 1}
    assert "finetun: unknown key (did you mean finetune?)" in error_of(data)


def test_wrong_type_names_field_and_value():
    message = error_of(tiny_recipe(finetune={"epochs": "ten"}))
    assert "finetune.epochs:" in message and "'ten'" in message


def test_bad_enum_value_lists_allowed_and_suggests():
    message = error_of(tiny_recipe(prune={"method": "dmp"}))
    assert "prune.method: 'dmp' is not allowed (did you mean dpm?)" in message
    assert "'oneshot'" in message


def test_out_of_range_number_names_bound():
    message = error_of(tiny_recipe(prune={"method": "oneshot", "target": {"macs": 1.5}}))
    assert "prune.target.macs:" in message and "less than 1" in message and "1.5" in message


def test_target_needs_exactly_one_kind():
    message = error_of(tiny_recipe(prune={"method": "oneshot", "target": {"macs": 0.5, "speedup": 2.0}}))
    assert ("prune.target: give exactly one of macs, speedup, channels, latency, latency_speedup, "
            "tokens_per_second_speedup (got macs, speedup)") in message


def test_schedule_end_after_training_is_rejected():
    message = error_of(tiny_recipe(prune={"method": "iterative", "schedule": {"end_epoch": 5}}, finetune={"epochs": 3}))
    assert "prune.schedule.end_epoch (5) is after finetune.epochs (3)" in message


def test_input_shape_must_match_channels():
    data = tiny_recipe()
    data["model"]["input_shape"] = [3, 16, 16]
    assert "model:" in error_of(data) and "in_channels=1" in error_of(data)


def test_bad_batch_sizes():
    assert "bench.batch_sizes:" in error_of(tiny_recipe(bench={"batch_sizes": [1, 0]}))
    assert "data.batch_size:" in error_of(tiny_recipe(data={"batch_size": 0}))


def test_overrides_are_typed(tmp_path):
    path = write(tmp_path, tiny_recipe())
    recipe = load_recipe(path, ["finetune.epochs=3", "bench.batch_sizes=[1, 4]", "finetune.amp=true",
                                "prune.target={speedup: 2.5}", "finetune.optimizer.lr=1e-3"])
    assert recipe.finetune.epochs == 3 and isinstance(recipe.finetune.epochs, int)
    assert recipe.bench.batch_sizes == [1, 4]
    assert recipe.finetune.amp is True
    assert recipe.prune.target.speedup == 2.5 and recipe.prune.target.remaining_macs() == pytest.approx(0.4)
    assert recipe.finetune.optimizer.lr == pytest.approx(1e-3)


def test_override_errors_name_the_key(tmp_path):
    path = write(tmp_path, tiny_recipe())
    with pytest.raises(RecipeError, match="prune.dpm.stpes: unknown key"):
        load_recipe(path, ["prune.dpm.stpes=3"])
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(path, ["finetune.epochs"])
    with pytest.raises(RecipeError, match="finetune.epochs is a value"):
        apply_override({"finetune": {"epochs": 2}}, "finetune.epochs.x=1")


def test_missing_recipe_file_is_clear(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_invalid_yaml_is_clear(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_defaults_fill_every_section():
    recipe = Recipe(name="x")
    assert recipe.prune.dpm.steps == 8 and recipe.verify.atol == 1e-4 and recipe.bench.backends == ["ort-cpu", "torch"]


# ---------------------------------------------------------------------------------------------- CLI (in-process)
@pytest.mark.parametrize("section, expected", [
    ({"prune": {"method": "dpm", "dpm": {"stpes": 4}}}, "prune.dpm.stpes: unknown key (did you mean steps?)"),
    ({"finetune": {"epochs": "ten"}}, "finetune.epochs:"),
    ({"prune": {"method": "dmp"}}, "prune.method: 'dmp' is not allowed (did you mean dpm?)"),
    ({"verify": {"atol": -1}}, "verify.atol:"),
])
def test_cli_validate_exits_2_naming_field(tmp_path, section, expected):
    path = write(tmp_path, tiny_recipe(**section))
    result = invoke_cli("recipes", "validate", path)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_validate_and_show_ok(tmp_path):
    path = write(tmp_path, tiny_recipe())
    result = invoke_cli("recipes", "validate", path)
    assert result.returncode == 0 and "ok:" in result.stdout
    shown = invoke_cli("recipes", "show", path, "--set", "finetune.epochs=7")
    assert shown.returncode == 0
    assert yaml.safe_load(shown.stdout)["finetune"]["epochs"] == 7


def test_cli_list_and_schema():
    listed = invoke_cli("recipes", "list")
    assert listed.returncode == 0
    for name in shipped_recipes():
        assert name in listed.stdout
    schema = invoke_cli("recipes", "schema")
    assert schema.returncode == 0 and '"prune"' in schema.stdout


def test_recipes_folder_is_the_repository_one():
    assert all(p.parent == REPO / "recipes" for p in shipped_recipes().values())


# ---------------------------------------------------------------------------------------------- YAML loading
def test_duplicated_top_level_key_and_inside_a_list(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: a\nname: b\n")
    with pytest.raises(RecipeError, match=r"'name' is given twice \(lines 1 and 2\)"):
        load_recipe(path)
    assert parse_recipe_yaml("a: [{b: 1}, {b: 2}]") == {"a": [{"b": 1}, {"b": 2}]}  # same key, different maps
    with pytest.raises(DuplicateKeyError) as info:
        parse_recipe_yaml("a:\n  - {b: 1, b: 2}\n")
    assert info.value.key == "a.0.b"


def test_merge_keys_may_still_be_overridden():
    data = parse_recipe_yaml("base: &b {lr: 0.1, momentum: 0.9}\nopt:\n  <<: *b\n  lr: 0.2\n")
    assert data["opt"] == {"lr": 0.2, "momentum": 0.9}


def test_duplicated_key_in_a_set_value_is_refused(tmp_path):
    path = write(tmp_path, tiny_recipe())
    with pytest.raises(RecipeError, match="'lr' appears twice"):
        load_recipe(path, ["finetune.optimizer={lr: 0.1, lr: 0.2}"])


@pytest.mark.parametrize("content, message", [
    (b"name: dup\nprune:\n  method: oneshot\n  target:\n    macs: 0.5\n    macs: 0.3\n",
     r"'prune.target.macs' is given twice \(lines 5 and 6\)"),
    (b"name: x\nfinetune:\n  epochs: [1\n", r"model.yaml is not valid YAML \(line \d+, column \d+"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "model.yaml is not a text file"),
    (b"  \n", "model.yaml is empty"),
    (b"- a\n", "must be a YAML mapping .* not a list"),
])
def test_bad_recipe_files_name_the_file_key_or_line(tmp_path, content, message):
    path = tmp_path / "model.yaml"
    path.write_bytes(content)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_set_alone_may_make_a_recipe_and_a_directory_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("  \n")
    assert load_recipe(empty, ["name=from-set"]).name == "from-set"
    with pytest.raises(RecipeError, match="is a directory"):
        load_recipe(tmp_path)
