"""Readable config errors: each names the key, what is wrong, and what the schema allows."""

from __future__ import annotations

import functools
from collections.abc import Collection
from pathlib import Path

import yaml

REMOVED_KEYS = {
    "convert.min_cosine": (
        "the gate no longer compares the INT8 model with its float master weights; it "
        "judges the deployed model: see convert.min_simulation_cosine, "
        "convert.max_loss_vs_fp32 and convert.max_loss_vs_ptq in config/README.md"
    ),
}
"""Keys of earlier versions, with what replaced them."""

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
"""The config schema: every key, its type, its description and its default."""


def schema_defaults(section: str, schema_path: str | Path = SCHEMA_PATH) -> dict:
    """The schema's default of every key of config section ``section`` (the one source).

    The settings classes (`n6qat.qat.QATSettings`, `n6qat.gate.GateSettings`,
    `n6qat.features.FeatureSettings`) take their defaults from here, so a default
    changed in the schema changes the package's too.
    """
    schema = _schema(str(schema_path))
    properties = schema["properties"][section]["properties"]
    return {key: prop["default"] for key, prop in properties.items() if "default" in prop}


def with_schema_defaults(section: str, **keys: str):
    """Class decorator (under ``@dataclass``): each field's default is the schema's.

    A field takes the default of the config key ``section.<field>``, or of the key named
    in ``keys`` (field name -> config key); lists become tuples. Fields the schema has
    no default for keep their own.
    """

    def decorate(cls):
        defaults = schema_defaults(section)
        for name in cls.__annotations__:
            key = keys.get(name, name)
            if key in defaults:
                value = defaults[key]
                setattr(cls, name, tuple(value) if isinstance(value, list) else value)
        return cls

    return decorate


@functools.cache
def _schema(path: str) -> dict:
    return yaml.safe_load(Path(path).read_text())


def config_errors(config: dict, schema_path: str | Path = SCHEMA_PATH) -> list[str]:
    """Every schema violation in ``config`` as one line naming the dotted key."""
    import jsonschema

    schema = _schema(str(schema_path))
    validator = jsonschema.Draft202012Validator(schema)
    lines = []
    for error in sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path)):
        key = ".".join(str(p) for p in error.absolute_path)
        if error.validator == "additionalProperties":
            extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            for name in extra:
                full = f"{key}.{name}" if key else name
                if full in REMOVED_KEYS:
                    lines.append(f"config key '{full}' was removed: {REMOVED_KEYS[full]}")
                    continue
                known = ", ".join(sorted(error.schema.get("properties", {})))
                lines.append(f"config key '{full}' is unknown (known here: {known})")
            continue
        hint = error.schema.get("description", "")
        lines.append(f"config key '{key}': {error.message}" + (f" ({hint})" if hint else ""))
    return lines


def coerce_config(config: dict, schema_path: str | Path = SCHEMA_PATH) -> dict:
    """Parse string leaves where the schema wants numbers or booleans, in place.

    ``snakemake --config 'qat={"epochs": 20}'`` delivers nested values as strings;
    ``"20"`` becomes 20 here so that command-line overrides validate like the file does.
    """
    schema = _schema(str(schema_path))
    _coerce(config, schema)
    return config


def _coerce(node: dict, schema: dict) -> None:
    for key, prop in schema.get("properties", {}).items():
        if key not in node:
            continue
        value = node[key]
        if isinstance(value, dict):
            _coerce(value, prop)
            continue
        types = prop.get("type", [])
        types = [types] if isinstance(types, str) else types
        if isinstance(value, str) and {"number", "integer", "boolean", "null"} & set(types):
            parsed = yaml.safe_load(value) if value.strip() else value
            if isinstance(parsed, str) and "number" in types:
                try:  # YAML 1.1 reads "2e-5" (no dot) as a string
                    parsed = float(parsed)
                except ValueError:
                    pass
            if not isinstance(parsed, (dict, list, str)):
                node[key] = parsed


TREE_EXPECTED = "expected a folder holding one sub-folder of audio files per class"


def input_path_errors(config: dict, generated: Collection[str] = ()) -> list[str]:
    """One line per input path of the (validated) config that is missing or of the wrong
    kind, naming the key, the path and what was expected.

    ``generated`` holds the keys whose paths a rule makes (the demo trees); they are not
    checked. The checkpoint is also read far enough to tell that it is a Keras file
    (`n6qat.keras_file`, no Keras import).
    """
    from n6qat.keras_file import keras_file_problem

    data, model = config["data"], config["model"]
    lines = []
    for key in ("train", "test"):
        path = data[key]
        if f"data.{key}" in generated or (key == "test" and not path):
            continue
        if not Path(path).is_dir():
            state = "is not a folder" if Path(path).exists() else "does not exist"
            lines.append(f"data.{key}: {_shown(path)} {state} ({TREE_EXPECTED})")
    if model["pretrained"]:
        problem = keras_file_problem(model["pretrained"])
        if problem == "does not exist":
            problem += " (expected a .keras checkpoint; leave model.pretrained empty to train one)"
        if problem:
            lines.append(f"model.pretrained: {_shown(model['pretrained'])} {problem}")
    if model["labels"] and not Path(model["labels"]).is_file():
        state = "is not a file" if Path(model["labels"]).exists() else "does not exist"
        lines.append(
            f"model.labels: {_shown(model['labels'])} {state} (expected the checkpoint's "
            "labels file, one class a line in output order; leave it empty to use "
            "<checkpoint stem>_labels.txt)"
        )
    return lines


def _shown(path: str) -> str:
    """The path as given, and where it points when it is relative."""
    absolute = Path(path).absolute()
    return path if Path(path).is_absolute() else f"{path} ({absolute})"
