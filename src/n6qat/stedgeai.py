"""Drive ST Edge AI Core's `stedgeai` (analyze, generate, validate on the board): find the
tool, build one step's command and run it into the step's folder (output/, workspace/,
run.json, console.txt), failing with the tool's error line and advice.

`stedgeai` is proprietary and often absent: whether it runs is decided when a step runs
(`locate_stedgeai`), and without it a step records that only the host check ran.
Commands are argument lists run without a shell. `n6qat.stedgeai_reports` parses what
the tool writes; `n6qat.npu_summary` reads the step folders into one model's result.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from n6qat.atomic import write_text
from n6qat.errors import N6QATError
from n6qat.names import STEDGEAI_STEPS as STEPS
from n6qat.stedgeai_reports import error_lines, parse_version
from n6qat.tool_output import last_lines
from n6qat.validation_npz import load_validation_npz

log = logging.getLogger(__name__)

RERUN_HINT = (
    "once stedgeai is installed, re-run with --forcerun npu_stedgeai "
    "(or delete results/npu/stedgeai)"
)
TOOL_MISSING_NOTE = f"stedgeai was not found; only the host check ran ({RERUN_HINT})"
NETWORK_NAME = "network"  # -n/--name; validation firmware expects the default
RUN_RECORD = "run.json"
CONSOLE_FILE = "console.txt"
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


def raise_for_failure(run: ToolRun, step: str) -> None:
    """N6QATError quoting the tool's error line (with advice) on a non-zero exit or E-line."""
    errors = error_lines(run.output)
    if run.returncode == 0 and not errors:
        return
    first = errors[0]["line"] if errors else last_lines(run.output, 5) or "(no output)"
    advice = ERROR_ADVICE.get(errors[0]["code"]) if errors else None
    raise N6QATError(
        f"stedgeai {step} failed (exit status {run.returncode}): {first}"
        + (f"\nWhat to do: {advice}" if advice else "")
        + f"\nCommand: {shlex.join(run.command)}"
    )


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
    """Split the convert stage's validation .npz into inputs and reference outputs as two
    .npy files, one array each, for --valinput and --valoutput."""
    if npz_path is None:
        raise N6QATError("stedgeai validate needs the model's validation .npz")
    arrays = load_validation_npz(npz_path)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "valinput.npy", folder / "valoutput.npy"
    for path, array in zip(paths, arrays, strict=True):
        np.save(path, array)
    return paths


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(data, indent=2) + "\n")
