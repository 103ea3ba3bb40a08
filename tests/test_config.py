"""The config schema: defaults for every key, unknown keys and wrong types named."""

from pathlib import Path

import yaml

from n6qat.config import coerce_config, config_errors

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"


def _walk(node, path=""):
    for name, prop in node.get("properties", {}).items():
        yield f"{path}{name}", prop
        yield from _walk(prop, f"{path}{name}.")


def test_every_key_has_a_default_and_a_description():
    schema = yaml.safe_load(SCHEMA.read_text())
    for key, prop in _walk(schema):
        assert "default" in prop, key
        assert prop.get("description"), key


def test_shipped_config_is_valid_and_documented():
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    assert config_errors(config, SCHEMA) == []
    readme = (ROOT / "config/README.md").read_text()
    schema = yaml.safe_load(SCHEMA.read_text())
    for key, _ in _walk(schema):
        assert f"`{key}`" in readme, f"config/README.md does not explain {key}"


def test_unknown_key_and_wrong_type_are_named():
    problems = config_errors({"qat": {"epocs": 3}, "features": {"n_fft": "big"}}, SCHEMA)
    assert any("'qat.epocs' is unknown" in p for p in problems)
    assert any("'features.n_fft'" in p and "integer" in p for p in problems)
    assert config_errors({"typo": 1}, SCHEMA) == [
        "config key 'typo' is unknown (known here: compute, convert, data, equalize, evaluate, "
        "features, model, npu, qat, split, stedgeai)"
    ]


def test_a_removed_key_says_what_replaced_it():
    (problem,) = config_errors({"convert": {"min_cosine": 0.95}}, SCHEMA)
    assert "'convert.min_cosine' was removed" in problem
    assert "convert.max_loss_vs_fp32" in problem and "min_simulation_cosine" in problem


def test_command_line_numbers_without_a_dot_are_numbers():
    config = {"qat": {"learning_rate": "2e-5", "epochs": "3"}}
    coerce_config(config, SCHEMA)
    assert config["qat"] == {"learning_rate": 2e-5, "epochs": 3}
