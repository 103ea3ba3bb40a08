"""Drive ST Edge AI Core's `stedgeai` (analyze, generate, validate on the board) and parse
what it writes, in the older (v2.x) and newer (v3.x) report layouts.

`stedgeai` is proprietary and often absent: whether it runs is decided when a step runs
(`locate_stedgeai`), and without it a step records that only the host check ran.
Commands are argument lists run without a shell. Parsing is tolerant: a block the report
does not hold gives None (or an empty list), never an exception.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from n6qat.atomic import write_text
from n6qat.errors import N6QATError

log = logging.getLogger(__name__)

STEPS = ("analyze", "generate", "validate")
RERUN_HINT = (
    "once stedgeai is installed, re-run with --forcerun npu_stedgeai_analyze "
    "npu_stedgeai_generate (or delete results/npu/stedgeai)"
)
TOOL_MISSING_NOTE = f"stedgeai was not found; only the host check ran ({RERUN_HINT})"
NETWORK_NAME = "network"  # -n/--name; validation firmware expects the default
RUN_RECORD = "run.json"
CONSOLE_FILE = "console.txt"
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
ERROR_ADVICE = {
    "E102": "a command-line argument was refused; on STM32N6 validation runs only on the "
    "board (--mode host is not supported): check stedgeai.extra_flags and stedgeai.profile",
    "E103": "the Neural-ART compiler fails on paths with non-ASCII characters: move the "
    "project (and the profile file) to a path of plain ASCII characters",
    "E801": "no serial port answered: connect the STM32N6570-DK's ST-LINK USB port, flash "
    "ST's NPU_Validation firmware (n6_loader.py), and set stedgeai.serial "
    "(e.g. serial:/dev/ttyACM0:921600); or set stedgeai.board: false",
    "E010": "stedgeai could not import the model: run `n6qat check` on it for the reason",
    "Timeout": "the board stopped answering during validation: reset it, flash the "
    "NPU_Validation firmware again and re-run",
}


@dataclass(frozen=True)
class StedgeaiSettings:
    """The `stedgeai` section of the config."""

    path: str = ""
    required: bool = False
    target: str = "stm32n6"
    profile: str = ""
    board: bool = False
    serial: str = "serial:921600"
    extra_flags: str = ""

    @classmethod
    def from_dict(cls, values: dict) -> StedgeaiSettings:
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


@dataclass
class ToolRun:
    """One finished call of the tool: its command, exit status and merged stdout/stderr."""

    command: list[str]
    returncode: int
    output: str
    duration_s: float


# --- finding and calling the tool ----------------------------------------------------------


def locate_stedgeai(path: str = "") -> tuple[Path | None, list[str]]:
    """(the executable or None, where it was looked for): `path` if given, else PATH."""
    if path:
        candidate = Path(path).expanduser()
        found = candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None
        return found, [str(candidate)]
    found = shutil.which("stedgeai")
    looked = [f"PATH: {os.environ.get('PATH', '')}"]
    return (Path(found) if found else None), looked


def missing_tool_message(looked_in: list[str]) -> str:
    return (
        "stedgeai was not found (looked in "
        + "; ".join(looked_in)
        + "). Install ST Edge AI Core and set stedgeai.path to its stedgeai executable, "
        "or put it on PATH"
    )


def split_extra_flags(text: str, target: str = "stm32n6") -> list[str]:
    """Split user flags like a POSIX shell would (quotes kept together, nothing expanded)."""
    try:
        flags = shlex.split(text)
    except ValueError as err:
        raise N6QATError(f"stedgeai.extra_flags cannot be split ({err}): {text!r}") from err
    if target.startswith("stm32n6") and "host" in _mode_values(flags):
        raise N6QATError(
            "stedgeai.extra_flags asks for --mode host, which stedgeai refuses on STM32N6 "
            "(E102(CliArgumentError)): validation runs on the board; remove --mode host"
        )
    return flags


def _mode_values(flags: list[str]) -> set[str]:
    values = {flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag == "--mode"}
    return values | {flag.split("=", 1)[1] for flag in flags if flag.startswith("--mode=")}


def build_command(
    step: str,
    executable: Path,
    model: Path,
    settings: StedgeaiSettings,
    output: Path,
    workspace: Path,
    valinput: Path | None = None,
    valoutput: Path | None = None,
) -> list[str]:
    """The argument list of one `stedgeai` step; validate adds the board and the data."""
    if step not in STEPS:
        raise N6QATError(f"unknown stedgeai step {step!r}; one of {STEPS}")
    command = [str(executable), step, "--model", str(model), "--target", settings.target]
    command += [
        "--st-neural-art",
        *([profile_argument(settings.profile)] if settings.profile else []),
    ]
    command += ["--name", NETWORK_NAME, "--output", str(output), "--workspace", str(workspace)]
    if step == "validate":
        if valinput is None or valoutput is None:
            raise N6QATError("stedgeai validate needs the validation inputs and outputs")
        command += ["--mode", "target", "-d", settings.serial]
        command += ["--valinput", str(valinput), "--valoutput", str(valoutput), "--classifier"]
    return command + split_extra_flags(settings.extra_flags, settings.target)


def profile_argument(profile: str) -> str:
    """PROFILE@FILE.json with FILE made absolute: the tool runs inside the step's folder."""
    name, at, file = profile.partition("@")
    return f"{name}@{Path(file).expanduser().resolve()}" if at and file else profile


def check_ascii_paths(paths: list[Path]) -> None:
    """Refuse non-ASCII paths before the call: the Neural-ART compiler fails with E103."""
    for path in paths:
        if not str(path).isascii():
            raise N6QATError(
                f"the path {path} holds non-ASCII characters; stedgeai's Neural-ART compiler "
                "fails on them (E103(CliRuntimeError): Error calling the Neural Art compiler). "
                "Move the project to a path of plain ASCII characters"
            )


def run_stedgeai(command: list[str], cwd: Path, timeout_s: float = 3600) -> ToolRun:
    """Run the tool without a shell; stdout and stderr merged, as the user would see them."""
    started = time.monotonic()
    try:
        done = subprocess.run(
            command,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise N6QATError(
            f"stedgeai did not finish within {timeout_s:.0f} s: {shlex.join(command)}"
        ) from err
    except OSError as err:
        raise N6QATError(f"cannot run {command[0]}: {err.strerror}") from err
    return ToolRun(command, done.returncode, done.stdout or "", time.monotonic() - started)


def tool_version(executable: Path) -> str | None:
    """The version `stedgeai --version` prints, or None when it says nothing usable."""
    try:
        done = subprocess.run(
            [str(executable), "--version"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_version(done.stdout or "")


def error_lines(text: str) -> list[dict]:
    """The tool's `E<nnn>(<Class>): message` lines and validation timeouts."""
    found = []
    for line in text.splitlines():
        match = re.search(r"\b(E\d{3})\((\w+)\):?\s*(.*)", line)
        if match:
            found.append(
                {
                    "code": match[1],
                    "kind": match[2],
                    "message": match[3].strip(),
                    "line": line.strip(),
                }
            )
        elif re.search(r"\bTimeout\b.*\bduring validation\b", line, re.IGNORECASE):
            found.append(
                {"code": "Timeout", "kind": "", "message": line.strip(), "line": line.strip()}
            )
    return found


def raise_for_failure(run: ToolRun, step: str) -> None:
    """N6QATError quoting the tool's error line (with advice) on a non-zero exit or E-line."""
    errors = error_lines(run.output)
    if run.returncode == 0 and not errors:
        return
    first = errors[0]["line"] if errors else _last_lines(run.output, 5) or "(no output)"
    advice = ERROR_ADVICE.get(errors[0]["code"]) if errors else None
    raise N6QATError(
        f"stedgeai {step} failed (exit status {run.returncode}): {first}"
        + (f"\nWhat to do: {advice}" if advice else "")
        + f"\nCommand: {shlex.join(run.command)}"
    )


def _last_lines(text: str, count: int) -> str:
    return "\n".join(text.strip().splitlines()[-count:])


# --- one workflow step -----------------------------------------------------------------------


def run_step(
    step: str,
    model: Path,
    settings: StedgeaiSettings,
    folder: Path,
    validation_npz: Path | None = None,
    timeout_s: float = 3600,
) -> dict:
    """Run one step into `folder` (output/, workspace/, run.json, console.txt) and return
    its run record; without the tool, record {"available": false, ...} and say that only
    the host check ran."""
    folder.mkdir(parents=True, exist_ok=True)
    executable, looked_in = tool_for_steps(settings)
    if executable is None:
        note = "stedgeai %s skipped for %s, only the host check ran (%s). %s"
        log.warning(note, step, model, RERUN_HINT, missing_tool_message(looked_in))
        record = {"available": False, "step": step, "looked_in": looked_in}
        _write_json(folder / RUN_RECORD, record)
        return record
    folder = folder.resolve()
    model = Path(model).resolve()
    command = step_command(step, executable, model, settings, folder, validation_npz)
    log.info("running: %s", shlex.join(command))
    run = run_stedgeai(command, cwd=folder, timeout_s=timeout_s)
    write_text(folder / CONSOLE_FILE, run.output)
    log.info("stedgeai %s output:\n%s", step, run.output)
    record = {
        "available": True,
        "step": step,
        "executable": str(executable),
        "version": tool_version(executable),
        "command": command,
        "returncode": run.returncode,
        "duration_s": round(run.duration_s, 3),
    }
    _write_json(folder / RUN_RECORD, record)
    raise_for_failure(run, step)
    return record


def tool_for_steps(settings: StedgeaiSettings) -> tuple[Path | None, list[str]]:
    """The executable (None when absent and optional) and where it was looked for.

    N6QATError when `stedgeai.path` names no executable or `stedgeai.required` is set.
    """
    executable, looked_in = locate_stedgeai(settings.path)
    if executable is None and settings.path:
        raise N6QATError(
            f"stedgeai.path is {settings.path!r}, which is not an executable file; "
            "point it at ST Edge AI Core's stedgeai, or leave it empty to look on PATH"
        )
    if executable is None and settings.required:
        raise N6QATError(missing_tool_message(looked_in) + " (stedgeai.required is true)")
    return executable, looked_in


def step_command(
    step: str,
    executable: Path,
    model: Path,
    settings: StedgeaiSettings,
    folder: Path,
    validation_npz: Path | None,
) -> list[str]:
    """The command of one step with its folders under `folder` (validate: its data too),
    after checking that every path is plain ASCII."""
    data = validation_arrays(validation_npz, folder / "data") if step == "validate" else ()
    paths = [model, folder, *data]
    if settings.profile:
        paths.append(Path(profile_argument(settings.profile)))
    check_ascii_paths(paths)
    output, workspace = folder / "output", folder / "workspace"
    return build_command(step, executable, model, settings, output, workspace, *data)


def validation_arrays(npz_path: Path | None, folder: Path) -> tuple[Path, Path]:
    """Split the convert stage's .npz into inputs and reference outputs as two .npy files,
    one array each, for --valinput and --valoutput."""
    from n6qat.convert import VALIDATION_INPUT_KEY, VALIDATION_OUTPUT_KEY

    if npz_path is None:
        raise N6QATError("stedgeai validate needs the model's validation .npz")
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "valinput.npy", folder / "valoutput.npy"
    try:
        with np.load(npz_path) as data:
            for path, key in zip(paths, (VALIDATION_INPUT_KEY, VALIDATION_OUTPUT_KEY), strict=True):
                np.save(path, data[key])
    except (OSError, ValueError, KeyError) as err:
        raise N6QATError(
            f"cannot read '{VALIDATION_INPUT_KEY}'/'{VALIDATION_OUTPUT_KEY}' from {npz_path}: {err}"
        ) from err
    return paths


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(data, indent=2) + "\n")


# --- report parsing --------------------------------------------------------------------------


def parse_version(text: str) -> str | None:
    """`3.0.0-20426 123672867`, `2.0.0-20049`, ... from a header or `--version` output."""
    match = re.search(r"(?<![\w.])v?(\d+\.\d+\.\d+[\w.-]*(?:[ \t]+[0-9a-f]{6,}\b)?)", text)
    return match[1] if match else None


def parse_header(text: str) -> dict:
    """Tool name and version, creation date and the command line from a report's header."""
    lines = [line.strip() for line in text.splitlines() if line.strip()][:5]
    tool = next(
        (line for line in lines if re.match(r"[A-Za-z]", line) and parse_version(line)), None
    )
    return {
        "tool": tool,
        "version": parse_version(tool) if tool else None,
        "created": _field(text, r"Created date"),
        "parameters": _field(text, r"Parameters"),
    }


def _field(text: str, name: str) -> str | None:
    match = re.search(rf"^\s*{name}\s*:\s*(.*?)\s*$", text, re.MULTILINE)
    return match[1] if match else None


def _number(text: str | None) -> int | None:
    """The first integer of a field ("4,210,944", "231,104 B (225.69 KiB) ...")."""
    if text is None:
        return None
    match = re.search(r"-?\d[\d,]*", text)
    return int(match[0].replace(",", "")) if match else None


def parse_summary(text: str) -> dict:
    """The summary block (model_fmt, params, macc, weights, activations, ram); None-filled."""
    params = _field(text, r"params #")
    return {
        "model_fmt": _field(text, r"model_fmt"),
        "params": _number(params),
        "macc": _number(_field(text, r"macc")),
        "weights_bytes": _number(_field(text, r"weights \(ro\)")),
        "activations_bytes": _number(_field(text, r"activations \(rw\)")),
        "ram_total_bytes": _number(_field(text, r"ram \(total\)")),
    }


def size_bytes(text: str) -> int | None:
    """ "294.000 kB" -> 301056 (the tool's kB and MB are 1024-based)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([kKMG]?)i?B\s*", text or "")
    if not match:
        return None
    return int(round(float(match[1]) * _UNITS[match[2].upper()]))


_SIZE = r"[\d.]+\s*[kKMG]?i?B"
_POOL_LINE = re.compile(
    rf"^\s*(?P<name>[A-Za-z][\w.]*)\s+\[(?P<start>0x[0-9A-Fa-f]+)\s*-\s*(?P<end>0x[0-9A-Fa-f]+)\]:"
    rf"\s*(?P<used>{_SIZE})\s*/\s*(?P<size>{_SIZE})\s*\(\s*(?P<percent>[\d.]+)\s*%\s*used\)"
    rf"(?:.*?weights:\s*(?P<weights>{_SIZE}).*?activations:\s*(?P<activations>{_SIZE}))?"
)
_TOTAL_LINE = re.compile(
    rf"^\s*Total:\s*(?P<used>{_SIZE})\s*--\s*weights:\s*(?P<weights>{_SIZE})"
    rf"\s*activations:\s*(?P<activations>{_SIZE})"
)


def parse_memory_pools(text: str) -> list[dict]:
    """Rows of "Memory usage information": name, address range, size, use, weights and
    activations in bytes."""
    pools = []
    for line in text.splitlines():
        match = _POOL_LINE.match(line)
        if match:
            pools.append(
                {
                    "name": match["name"],
                    "address": match["start"],
                    "end": match["end"],
                    "size_bytes": size_bytes(match["size"]),
                    "used_bytes": size_bytes(match["used"]),
                    "used_percent": float(match["percent"]),
                    "weights_bytes": size_bytes(match["weights"] or ""),
                    "activations_bytes": size_bytes(match["activations"] or ""),
                }
            )
    return pools


def parse_memory_total(text: str) -> dict | None:
    match = next(filter(None, map(_TOTAL_LINE.match, text.splitlines())), None)
    if match is None:
        return None
    return {key: size_bytes(match[key]) for key in ("used", "weights", "activations")}


def parse_epochs(text: str) -> dict | None:
    """Epoch counts and the ops that run in software, in either report layout."""
    rows = _epoch_rows(text)
    newer = re.search(r"^\s*Total number of epochs\s+(\d+)", text, re.MULTILINE)
    older = re.search(
        r"Total number of epochs:\s*(\d+)(?:\s+of which\s+(\d+)\s+implemented in software)?",
        text,
    )
    if newer:
        counts = {
            "total": int(newer[1]),
            "software": _count(text, r">>\s*pure software \(SW\) epochs"),
            "hybrid": _count(text, r">>\s*hybrid epochs[^\n]*?\)"),
            "hardware": _count(text, r">>\s*pure hardware \(HW or EC\) epochs"),
            "layout": "v3",
        }
    elif older:
        total = int(older[1])
        software = int(older[2]) if older[2] else _kind_count(rows, "SW")
        hybrid = _kind_count(rows, "HYBRID") if rows else None
        counts = {
            "total": total,
            "software": software,
            "hybrid": hybrid,
            "hardware": total - software - (hybrid or 0) if software is not None else None,
            "layout": "v2",
        }
    elif rows:
        counts = {"total": None, "software": _kind_count(rows, "SW"), "hybrid": None}
        counts.update(hardware=None, layout=None)
    else:
        return None
    counts["software_ops"] = [r for r in rows if r["kind"] == "SW"]
    counts["hybrid_ops"] = [r for r in rows if r["kind"] == "HYBRID"]
    return counts


def _count(text: str, label: str) -> int | None:
    match = re.search(label + r"\s+(\d+)", text)
    return int(match[1]) if match else None


def _kind_count(rows: list[dict], kind: str) -> int:
    return sum(r["kind"] == kind for r in rows)


def _epoch_rows(text: str) -> list[dict]:
    """`| epoch_31 |  SW  | Softmax |` (v3) and `epoch 31  -SW-  ( Softmax )` (v2) rows."""
    rows = []
    for line in text.splitlines():
        match = re.match(r"^\s*\|\s*epoch_(\d+)\s*\|\s*([A-Za-z/+ ]+?)\s*\|\s*(.*?)\s*\|", line)
        match = match or re.match(
            r"^\s*epoch\s+(\d+)\s+-([A-Za-z/+]+)-\s*(?:\(\s*(.*?)\s*\))?", line
        )
        if match:
            kind = _epoch_kind(match[2])
            rows.append({"epoch": int(match[1]), "kind": kind, "op": match[3] or None})
    return rows


def _epoch_kind(tag: str) -> str:
    tag = tag.strip().upper()
    if tag.startswith("HY") or ("SW" in tag and ("HW" in tag or "EC" in tag)):
        return "HYBRID"
    return tag


def _metric_value(token: str) -> float | None:
    token = token.strip().rstrip("%")
    if token.lower() in {"n.a.", "n.a", "na", "nan", "-", ""}:
        return None
    try:
        return float(token)
    except ValueError:
        return None


def parse_validation_table(text: str) -> list[dict]:
    """Every row of every "Evaluation report" table (TARGET/HOST c-model, original model,
    X-cross, ...): metrics by column name, `acc` in percent, `n.a.` as None."""
    rows: list[dict] = []
    columns, in_rows = None, False
    for line in text.splitlines():
        tokens = line.split()
        if tokens[:1] == ["Output"] and "rmse" in tokens:
            end = tokens.index("tensor") if "tensor" in tokens else len(tokens)
            columns, in_rows = tokens[1:end], False
        elif columns is None or (tokens and set(line.strip()) <= {"-", "="}):
            continue  # outside a table, or a rule line inside one
        elif not tokens:
            columns = None if in_rows else columns  # a blank line after the rows ends them
        else:
            row = _table_row(line, columns)
            if row is None:
                columns = None
            else:
                rows.append(row)
                in_rows = True
    return rows


def _table_row(line: str, columns: list[str]) -> dict | None:
    match = re.match(r"^\s*(?P<name>[A-Za-z][\w .-]*?)\s*#(?P<index>\d+)\s+(?P<rest>.*)$", line)
    if not match:
        return None
    cells = match["rest"].split(None, len(columns))
    values = cells[: len(columns)]
    row = {
        "row": f"{match['name']} #{match['index']}",
        "kind": match["name"],
        "output": int(match["index"]),
    }
    row.update({name: _metric_value(v) for name, v in zip(columns, values, strict=False)})
    row.update({name: None for name in columns[len(values) :]})
    row["tensor"] = cells[len(columns)] if len(cells) > len(columns) else None
    return row


def parse_compact_metrics(text: str) -> list[dict]:
    """The one-line form `acc=n.a. rmse=... cos=...`, one dict per line that has it."""
    found = []
    for line in text.splitlines():
        if "rmse=" not in line:
            continue
        pairs = re.findall(r"\b(acc|rmse|mae|l2r|mean|std|nse|cos)=(\S+)", line)
        label = line.split(pairs[0][0] + "=", 1)[0].strip(" :-") if pairs else ""
        entry = {name: _metric_value(value.rstrip(",")) for name, value in pairs}
        found.append({"label": label or None, **entry})
    return found


def parse_profiling(text: str) -> dict | None:
    """Samples and duration per sample (mean, min, max, std) of an on-target run."""
    samples = _number(_field(text, r"nb sample\(s\)"))
    duration = re.search(
        r"^\s*duration\s*:\s*([\d.]+)\s*ms by sample(?:\s*\(([\d.]+)/([\d.]+)/([\d.]+)\))?",
        text,
        re.MULTILINE,
    )
    if samples is None and duration is None:
        return None
    groups = duration.groups() if duration else (None,) * 4
    mean, low, high, std = (float(v) if v else None for v in groups)
    return {"samples": samples, "ms_per_sample": mean, "ms_min": low, "ms_max": high, "ms_std": std}


def parse_report(text: str) -> dict:
    """Everything one text report (or the console output) holds."""
    return {
        "header": parse_header(text),
        "summary": parse_summary(text),
        "memory_pools": parse_memory_pools(text),
        "memory_total": parse_memory_total(text),
        "epochs": parse_epochs(text),
        "validation": parse_validation_table(text),
        "validation_compact": parse_compact_metrics(text),
        "profiling": parse_profiling(text),
        "errors": error_lines(text),
    }


def parse_c_info(data: dict) -> dict:
    """Version, memory footprint, pools and node mapping from network_c_info.json (2.0)."""
    graphs = data.get("graphs") or [{}]
    nodes = graphs[0].get("nodes") or [] if isinstance(graphs[0], dict) else []
    mapping: dict[str, int] = {}
    for node in nodes:
        kind = node.get("mapping", "NODE_UNDEF") if isinstance(node, dict) else "NODE_UNDEF"
        mapping[kind] = mapping.get(kind, 0) + 1
    return {
        "schema_version": data.get("json_schema_version"),
        "version": _c_info_version(data),
        "memory_footprint": data.get("memory_footprint"),
        "memory_pools": [
            _c_info_pool(p) for p in data.get("memory_pools") or [] if isinstance(p, dict)
        ],
        "node_mapping": mapping,
        "software_nodes": _node_names(nodes, "NODE_SW"),
        "hybrid_nodes": _node_names(nodes, "NODE_SW_HW"),
    }


def _node_names(nodes: list, mapping: str) -> list[str]:
    return [n.get("name") for n in nodes if isinstance(n, dict) and n.get("mapping") == mapping]


def _c_info_version(data: dict) -> str | None:
    try:
        version = data["environment"]["tools"][0]["version"]
    except (KeyError, IndexError, TypeError):
        return None
    if isinstance(version, dict):
        parts = [version.get(k) for k in ("major", "minor", "micro")]
        text = ".".join(str(p) for p in parts if p is not None)
        return text + (f"-{version['extra']}" if version.get("extra") else "") or None
    if isinstance(version, list):
        return ".".join(map(str, version))
    return str(version)


def _c_info_pool(pool: dict) -> dict:
    return {
        key: pool.get(key) for key in ("name", "size_bytes", "used_size_bytes", "address", "rights")
    }


# --- one model's result ----------------------------------------------------------------------


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
