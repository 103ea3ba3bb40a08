"""Readable config errors: each names the key, what is wrong, and what the schema allows."""

from __future__ import annotations

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


def config_errors(config: dict, schema_path: str | Path) -> list[str]:
    """Every schema violation in ``config`` as one line naming the dotted key."""
    import jsonschema

    schema = yaml.safe_load(Path(schema_path).read_text())
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


def coerce_config(config: dict, schema_path: str | Path) -> dict:
    """Parse string leaves where the schema wants numbers or booleans, in place.

    ``snakemake --config 'qat={"epochs": 20}'`` delivers nested values as strings;
    ``"20"`` becomes 20 here so that command-line overrides validate like the file does.
    """
    schema = yaml.safe_load(Path(schema_path).read_text())
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
            if not isinstance(parsed, (dict, list, str)):
                node[key] = parsed
