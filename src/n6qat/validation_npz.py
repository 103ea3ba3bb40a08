"""The validation .npz: inputs and the float model's outputs for `stedgeai validate` and
the host check. This module owns its format, the writer and the reader.

The keys follow the tool's own dump (network_val_io.npz), which names arrays
m_inputs_<k> / m_outputs_<k> / c_outputs_<k>, k from 1; one model input and one output
give "m_inputs_1" (N, *model input without batch) and "m_outputs_1" (N, *output).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from n6qat.atomic import atomic_path
from n6qat.errors import N6QATError

VALIDATION_INPUT_KEY = "m_inputs_1"
VALIDATION_OUTPUT_KEY = "m_outputs_1"


def save_validation_npz(path: Path, inputs: np.ndarray, outputs: np.ndarray) -> None:
    """Write inputs and reference outputs for `stedgeai validate --valinput`, atomically.

    One .npz holds both, under VALIDATION_INPUT_KEY and VALIDATION_OUTPUT_KEY; ST's
    tutorials give such a single file to --valinput alone. float64 is stored as float32,
    the model's I/O type.
    """
    path = Path(path)
    inputs, outputs = np.asarray(inputs), np.asarray(outputs)
    if len(inputs) != len(outputs) or len(inputs) == 0:
        raise N6QATError(
            f"validation data for {path} needs as many outputs as inputs (at least one); "
            f"got {len(inputs)} inputs and {len(outputs)} outputs"
        )
    arrays = {
        VALIDATION_INPUT_KEY: _as_io_dtype(inputs),
        VALIDATION_OUTPUT_KEY: _as_io_dtype(outputs),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def _as_io_dtype(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) if array.dtype == np.float64 else array


def load_validation_npz(npz_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, the float model's outputs), both as stored, from a validation .npz.

    N6QATError when the file is not a readable .npz or lacks either array.
    """
    keys = (VALIDATION_INPUT_KEY, VALIDATION_OUTPUT_KEY)
    try:
        with np.load(npz_path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in keys if k in data}
    except (OSError, ValueError, AttributeError) as err:
        raise N6QATError(
            f"cannot read validation data {npz_path}: not a readable .npz of arrays ({err})"
        ) from err
    if len(arrays) != 2:
        raise N6QATError(
            f"validation data {npz_path} needs arrays '{keys[0]}' (inputs) and '{keys[1]}' "
            "(the float model's outputs), as the convert stage writes them"
        )
    return arrays[keys[0]], arrays[keys[1]]
