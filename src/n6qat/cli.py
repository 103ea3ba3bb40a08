"""The `n6qat` command: `n6qat check MODEL.tflite` runs the host-side STM32N6 check on any model.

Exit status: 0 when the model is N6-clean (warnings allowed), 1 when it has errors,
2 when the input cannot be used (not a TFLite file, truncated, unreadable data).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from n6qat.errors import N6QATError

EXIT_CLEAN, EXIT_ERRORS, EXIT_UNUSABLE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="n6qat", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check",
        help="host-side STM32N6 NPU check of a full-INT8 .tflite",
        description="Operators (NPU or CPU), quantization, shapes, memory and MACC of a "
        "full-INT8 .tflite against the STM32N6 Neural-ART NPU; with --validation-data also "
        "stedgeai's metrics of the INT8 model against the float model's outputs.",
    )
    check.add_argument("model", type=Path, help="the .tflite to check")
    check.add_argument("--json", type=Path, metavar="OUT", help="also write the report as JSON")
    check.add_argument(
        "--validation-data",
        type=Path,
        metavar="NPZ",
        help="a .npz with inputs 'm_inputs_1' and float outputs 'm_outputs_1' "
        "(as the workflow's results/model_*_int8_validation.npz)",
    )
    check.add_argument("--threads", type=int, default=1, help="LiteRT threads (default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_check(args.model, args.json, args.validation_data, args.threads)


def run_check(model: Path, json_out: Path | None, validation: Path | None, threads: int = 1) -> int:
    """Print the report; the exit status says clean (0), errors (1) or unusable input (2)."""
    from n6qat.n6 import check_model, format_host_check, write_host_check

    try:
        check = check_model(model, validation, num_threads=threads)
        if json_out is not None:
            write_host_check(check, json_out)
    except N6QATError as err:
        print(f"n6qat check: {err}", file=sys.stderr)
        return EXIT_UNUSABLE
    except OSError as err:
        print(f"n6qat check: cannot write {err.filename}: {err.strerror}", file=sys.stderr)
        return EXIT_UNUSABLE
    sys.stdout.write(format_host_check(check))
    return EXIT_CLEAN if check.clean else EXIT_ERRORS


if __name__ == "__main__":
    sys.exit(main())
