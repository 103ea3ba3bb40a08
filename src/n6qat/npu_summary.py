"""The NPU stage's results per model: stedgeai's step folders read into
`<model>_stedgeai.json`, the host check's estimates beside the tool's numbers in
`results/npu/summary.json`, and reading such per-model JSON files back."""

from __future__ import annotations

import json
from pathlib import Path

from n6qat.stedgeai import CONSOLE_FILE, NETWORK_NAME, RUN_RECORD, STEPS, TOOL_MISSING_NOTE
from n6qat.stedgeai_reports import (
    error_lines,
    parse_c_info,
    parse_report,
    parse_validation_table,
)


def read_by_model(models: list[str], paths: list[str | Path]) -> dict[str, dict]:
    """Model name -> its parsed JSON file, `models` and `paths` in the same order."""
    return {m: json.loads(Path(p).read_text()) for m, p in zip(models, paths, strict=True)}


# --- one model's stedgeai result ---------------------------------------------------------------


def parse_step_folder(folder: Path, step: str) -> dict:
    """The run record and the parsed report (or console output) of one step's folder."""
    record = _read_json(folder / RUN_RECORD) or {}
    report = _find_report(folder / "output", step)
    console = folder / CONSOLE_FILE
    text = report.read_text(errors="replace") if report else ""
    if not text and console.is_file():
        text = console.read_text(errors="replace")
    parsed = parse_report(text)
    if console.is_file() and report:
        console_text = console.read_text(errors="replace")
        parsed["validation"] = parsed["validation"] or parse_validation_table(console_text)
        parsed["errors"] += error_lines(console_text)
    return {"run": record, "report": str(report) if report else None, **parsed}


def _find_report(output: Path, step: str) -> Path | None:
    exact = output / f"{NETWORK_NAME}_{step}_report.txt"
    if exact.is_file():
        return exact
    return (
        next(iter(sorted(output.glob(f"*_{step}_report.txt"))), None) if output.is_dir() else None
    )


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collect_report(model: str, step_folders: dict[str, Path]) -> dict:
    """One model's `<model>_stedgeai.json`: availability, steps, c_info and headline numbers."""
    records = {step: _read_json(Path(f) / RUN_RECORD) or {} for step, f in step_folders.items()}
    if not any(r.get("available") for r in records.values()):
        looked_in = next((r["looked_in"] for r in records.values() if r.get("looked_in")), [])
        return {
            "available": False,
            "model": model,
            "looked_in": looked_in,
            "message": TOOL_MISSING_NOTE,
        }
    steps = {step: parse_step_folder(Path(f), step) for step, f in step_folders.items()}
    c_info = _first_c_info(step_folders)
    return {
        "available": True,
        "model": model,
        "version": _first(
            s["run"].get("version") or s["header"]["version"] for s in steps.values()
        ),
        "steps": steps,
        "c_info": c_info,
        "headline": headline_numbers(steps, c_info),
    }


def _first_c_info(step_folders: dict[str, Path]) -> dict | None:
    for step in ("generate", "analyze", "validate"):
        if step in step_folders:
            data = _read_json(Path(step_folders[step]) / "output" / f"{NETWORK_NAME}_c_info.json")
            if data is not None:
                return parse_c_info(data)
    return None


def _first(values):
    return next((v for v in values if v is not None), None)


def headline_numbers(steps: dict[str, dict], c_info: dict | None) -> dict:
    """MACC, parameters, weights and activations bytes, epochs and validation, taken from
    the first report that has them (analyze, generate, validate), then from
    network_c_info.json, then from the memory usage totals."""
    ordered = [steps[s] for s in STEPS if s in steps]
    footprint = (c_info or {}).get("memory_footprint") or {}
    total = _first(s["memory_total"] for s in ordered) or {}
    validate = steps.get("validate") or {}
    return {
        "macc": _first(s["summary"]["macc"] for s in ordered),
        "params": _first(s["summary"]["params"] for s in ordered),
        "weights_bytes": _first(
            [
                *(s["summary"]["weights_bytes"] for s in ordered),
                _int_or_none(footprint.get("weights")),
                total.get("weights"),  # kB with 3 decimals: the least exact
            ]
        ),
        "activations_bytes": _first(
            [
                *(s["summary"]["activations_bytes"] for s in ordered),
                _int_or_none(footprint.get("activations")),
                total.get("activations"),  # kB with 3 decimals: the least exact
            ]
        ),
        "memory_pools": _first(s["memory_pools"] or None for s in ordered) or [],
        "epochs": _first(s["epochs"] for s in ordered),
        "validation": validate.get("validation") or [],
        "profiling": validate.get("profiling"),
    }


def _int_or_none(value) -> int | None:
    return int(value) if isinstance(value, int | float) else None


# --- host check vs tool --------------------------------------------------------------------


def compare_with_host_check(host: dict, tool: dict) -> dict:
    """The host check's estimates beside the tool's numbers for one model."""
    summary = {
        "host": {
            "clean": host.get("clean"),
            "errors": host.get("error_count"),
            "warnings": host.get("warning_count"),
            "macc": host.get("macc"),
            "weights_bytes": host["memory"]["weights_bytes"],
            "peak_activation_bytes": host["memory"]["peak_activation_bytes"],
            "activations_fit": host["memory"]["fits"],
            "cpu_ops": [
                f"{op['index']} {op['opcode']}" for op in host["operators"] if op["unit"] == "CPU"
            ],
            "metrics": host.get("metrics"),
        },
        "stedgeai": {"available": bool(tool.get("available"))},
    }
    if not tool.get("available"):
        summary["stedgeai"]["message"] = tool.get("message")
        summary["comparison"] = None
        return summary
    head = tool["headline"]
    epochs = head.get("epochs") or {}
    summary["stedgeai"].update(
        version=tool.get("version"),
        macc=head.get("macc"),
        weights_bytes=head.get("weights_bytes"),
        activations_bytes=head.get("activations_bytes"),
        software_epochs=epochs.get("software"),
        software_ops=[r["op"] for r in epochs.get("software_ops", [])],
        validation=head.get("validation"),
    )
    summary["comparison"] = {
        "macc": _pair(host.get("macc"), head.get("macc")),
        "weights_bytes": _pair(host["memory"]["weights_bytes"], head.get("weights_bytes")),
        "activations_bytes": _pair(
            host["memory"]["peak_activation_bytes"], head.get("activations_bytes")
        ),
    }
    return summary


def _pair(host_value, tool_value) -> dict:
    ratio = tool_value / host_value if host_value and tool_value is not None else None
    return {"host": host_value, "stedgeai": tool_value, "stedgeai_over_host": ratio}


def summarize_npu(host_checks: dict[str, dict], tool_reports: dict[str, dict]) -> dict:
    """`results/npu/summary.json`: per model, the host check beside stedgeai's numbers."""
    return {
        "models": {
            name: compare_with_host_check(host, tool_reports.get(name, {}))
            for name, host in host_checks.items()
        },
        "stedgeai_available": any(r.get("available") for r in tool_reports.values()),
    }
