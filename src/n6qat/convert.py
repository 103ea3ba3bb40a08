"""Full-INT8 post-training conversion of a Keras model to TFLite, and checks on the result.

The converter path is Keras `model.export` (a SavedModel with a batch-1 signature) then
`tf.lite.TFLiteConverter.from_saved_model`: it freezes the Keras 3 variables, folds
BatchNormalization with its moving statistics, and gives the converted model a static
input shape [1, ...] as the NPU wants. ``convert_int8(..., signature=False)`` freezes the
forward function itself and converts that: the same graph, so the same INT8 tensors and
outputs (tested tensor by tensor), in about a third of the time, but without the
``serving_default`` signature; QAT scores its epochs with it, every deliverable has the
signature. TensorFlow is imported inside the functions that
need it (LiteRT inside `n6qat.litert`) so that importing this module stays cheap.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from n6qat.atomic import write_bytes, write_csv, write_text
from n6qat.errors import N6QATError
from n6qat.litert import run_tflite
from n6qat.metrics import agreement
from n6qat.tool_output import last_lines, native_stderr_captured
from n6qat.validation_npz import save_validation_npz

if TYPE_CHECKING:
    import keras
    import pandas as pd

log = logging.getLogger(__name__)

IO_DTYPES = ("float32", "int8")


def select_representative(
    labels: np.ndarray, energies: np.ndarray, n: int, energy_threshold: float, seed: int
) -> np.ndarray:
    """Sorted indices of up to `n` calibration chunks, the same share from every class.

    Chunks with energy below `energy_threshold` (near silence) are skipped. Each label
    (with -1, negatives/noise, as one more stratum) gets an equal quota so that rare
    classes still shape the activation ranges; quota a stratum cannot fill passes to the
    others. The same seed gives the same indices.
    """
    labels = np.asarray(labels).reshape(-1)
    energies = np.asarray(energies, dtype=np.float64).reshape(-1)
    if labels.shape != energies.shape:
        raise N6QATError(
            f"calibration selection got {labels.size} labels but {energies.size} energies; "
            "they must describe the same chunks"
        )
    if n < 1:
        raise N6QATError(f"convert.calibration_size must be at least 1, got {n}")
    eligible = np.flatnonzero(np.isfinite(energies) & (energies >= energy_threshold))
    if eligible.size == 0:
        loudest = float(np.nanmax(energies)) if np.isfinite(energies).any() else float("nan")
        raise N6QATError(
            f"no chunk reaches convert.calibration_energy_threshold={energy_threshold:g} "
            f"(loudest chunk: {loudest:g} over {energies.size} chunks); lower the threshold"
        )
    if eligible.size <= n:
        return eligible
    rng = np.random.default_rng(seed)
    strata = [rng.permutation(eligible[labels[eligible] == c]) for c in np.unique(labels[eligible])]
    quotas = _equal_quotas([len(s) for s in strata], n)
    return np.sort(np.concatenate([s[:q] for s, q in zip(strata, quotas, strict=True)]))


def _equal_quotas(sizes: list[int], n: int) -> list[int]:
    """Split n across strata as evenly as their sizes allow (sum(sizes) > n)."""
    quotas = [0] * len(sizes)
    left = n
    while left > 0:
        open_ = [i for i, size in enumerate(sizes) if quotas[i] < size]
        share, extra = divmod(left, len(open_))
        for rank, i in enumerate(open_):
            take = min(sizes[i] - quotas[i], share + (rank < extra))
            quotas[i] += take
            left -= take
    return quotas


def convert_int8(
    model: keras.Model,
    representative: np.ndarray,
    per_channel: bool = True,
    io_dtype: str = "float32",
    batch_size: int = 1,
    signature: bool = True,
) -> bytes:
    """Convert to a full-INT8 .tflite (TFLITE_BUILTINS_INT8 only, no float fallback).

    `representative` holds calibration inputs shaped like the model input without the
    batch axis. io_dtype "int8" makes the model's input/output int8 too (the NPU then
    needs no CPU QUANTIZE/DEQUANTIZE, but the caller must quantize its data).
    `per_channel=False` gives per-tensor weight scales. ``signature=False`` skips the
    SavedModel export: same INT8 tensors, no ``serving_default`` signature, other names
    for the input and output tensors (see the module docstring).
    """
    import tensorflow as tf

    name = getattr(model, "name", "model")
    if io_dtype not in IO_DTYPES:
        raise N6QATError(
            f"io_dtype must be one of {IO_DTYPES} for model '{name}', got {io_dtype!r}"
        )
    if batch_size < 1:
        raise N6QATError(f"batch_size must be at least 1 for model '{name}', got {batch_size}")
    input_shape = _single_input_shape(model)
    samples = _checked_representative(name, representative, input_shape, batch_size)
    spec = tf.TensorSpec((batch_size, *input_shape), tf.float32, name="input")

    def calibration_batches() -> Iterator[list[np.ndarray]]:
        for start in range(0, len(samples) - batch_size + 1, batch_size):
            yield [samples[start : start + batch_size]]

    def converted(converter) -> bytes:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = calibration_batches
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8 if io_dtype == "int8" else tf.float32
        converter.inference_output_type = tf.int8 if io_dtype == "int8" else tf.float32
        converter._experimental_disable_per_channel = not per_channel
        return converter.convert()

    # Only the SavedModel path needs a folder (a process killed in it leaves the folder).
    export = tempfile.TemporaryDirectory(prefix="n6qat_export_") if signature else nullcontext()
    with export as export_dir:
        with native_stderr_captured() as captured:
            try:
                if signature:
                    model.export(
                        export_dir, format="tf_saved_model", input_signature=[spec],
                        verbose=False,
                    )  # fmt: skip
                    tflite_bytes = converted(tf.lite.TFLiteConverter.from_saved_model(export_dir))
                else:
                    tflite_bytes = converted(
                        tf.lite.TFLiteConverter.from_concrete_functions([_frozen(model, spec)])
                    )
            except Exception as err:
                failure = err
            else:
                failure = None
    log.debug("converter output for model '%s':\n%s", name, captured.text)
    if failure is not None:
        raise N6QATError(
            f"model '{name}' could not be converted to full INT8 "
            f"({type(failure).__name__}: {_converter_reason(str(failure))}); every layer must map "
            f"to an INT8 TFLite builtin: replace the layer named in the message. "
            f"Converter log tail:\n{last_lines(captured.text, 15)}"
        ) from failure
    macs = re.search(r"equivalently ([\d.]+ \w?) *MACs", captured.text)
    log.info(
        "converted model '%s' to %d bytes of full-INT8 TFLite (converter estimate: %s MACs)",
        name,
        len(tflite_bytes),
        macs.group(1).strip() if macs else "no",
    )
    return bytes(tflite_bytes)


def _frozen(model: keras.Model, spec):
    """The model's inference function for ``spec`` with its current weights as constants.

    The traced function is kept on the model (one per input spec), so only the freezing
    runs again after the weights change.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    # In __dict__: an attribute set the usual way would be tracked by Keras as model state.
    traced = model.__dict__.setdefault("_n6qat_inference_functions", {})
    key = tuple(spec.shape)
    if key not in traced:
        traced[key] = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    return convert_variables_to_constants_v2(traced[key])


def _single_input_shape(model: keras.Model) -> tuple[int, ...]:
    name = getattr(model, "name", "model")
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1:
        raise N6QATError(f"model '{name}' has {len(inputs)} inputs; conversion handles exactly one")
    shape = tuple(inputs[0].shape[1:])
    if any(d is None for d in shape):
        raise N6QATError(
            f"model '{name}' has input shape {shape} with unknown sizes; "
            "build it with a fixed feature shape (the NPU needs static shapes)"
        )
    return tuple(int(d) for d in shape)


def _checked_representative(
    name: str, representative: np.ndarray, input_shape: tuple[int, ...], batch_size: int
) -> np.ndarray:
    samples = np.asarray(representative, dtype=np.float32)
    if samples.shape[1:] != input_shape:
        raise N6QATError(
            f"calibration data of shape {samples.shape} does not fit model '{name}' "
            f"(expects (N, {', '.join(map(str, input_shape))}))"
        )
    if len(samples) < batch_size:
        raise N6QATError(
            f"model '{name}' needs at least {batch_size} calibration samples, got {len(samples)}"
        )
    if not np.isfinite(samples).all():
        raise N6QATError(f"calibration data for model '{name}' holds NaN or infinite values")
    return samples


def _converter_reason(text: str) -> str:
    """The converter's own error messages, with the graph node instead of the MLIR location."""
    reasons = []
    for line in text.splitlines():
        if line.startswith(("Custom ops:", "Flex ops:")):
            reasons.append(line.strip())
        if "error: " not in line:
            continue
        reason = line.rsplit("error: ", 1)[1].strip()
        if reason.startswith("loc("):
            node = re.search(r'"([^"@]+)@', reason)
            reason = reason.rsplit("): ", 1)[-1] + (f" (at {node.group(1)})" if node else "")
        if reason and not reason.startswith("failed while converting"):
            reasons.append(reason)
    unique = list(dict.fromkeys(reasons))
    return "; ".join(unique[:4]) if unique else (text.strip().splitlines() or [""])[0][:300]


def calibration_set(features: np.ndarray, chunks: pd.DataFrame, settings: dict) -> np.ndarray:
    """The representative chunks the converter calibrates on (QAT simulates the same ranges)."""
    picked = select_representative(
        chunks["label_index"].to_numpy(), chunks["energy"].to_numpy(),
        settings["calibration_size"], settings["calibration_energy_threshold"], settings["seed"],
    )
    return np.asarray(features[picked], dtype=np.float32)


def convert_and_measure(
    model: keras.Model,
    name: str,
    train: tuple[np.ndarray, pd.DataFrame],
    val: tuple[np.ndarray, pd.DataFrame],
    settings: dict,
    out_tflite: Path,
    out_validation: Path,
    out_report: Path,
    labels: list[str],
    reference: keras.Model | None = None,
    pooling: str = "mean",
    threshold: float = 0.5,
    out_layers: Path | None = None,
    layer_samples: int = 64,
    out_weights: Path | None = None,
) -> dict:
    """Convert ``model`` to full INT8 and measure what the INT8 gate judges.

    Calibration draws ``calibration_size`` loud-enough training chunks, stratified by
    class. On the whole validation split the TFLite is compared with the model's INT8
    simulation (fidelity) and with the FP32 ``reference`` (default: ``model``) in
    file-level metrics; ``n6qat.gate.gate_candidate`` judges the report and publishes the
    model. The TFLite and the report are the gate's candidate; ``validation_size``
    validation chunks are saved with the float model's outputs for ``stedgeai validate``
    and the host check. With ``out_layers``, the per-tensor diagnostic
    (``n6qat.layer_fidelity``) of the first ``layer_samples`` of them is written there as
    CSV (one LiteRT thread); with ``out_weights``, each layer's weight SQNR against the
    float kernel it came from (``n6qat.report_tables.weight_sqnr``). Nothing is written
    unless the model is pure INT8.
    """
    from n6qat.gate import quality
    from n6qat.int8_twin import simulated_int8
    from n6qat.model import predict
    from n6qat.tflite_inspect import int8_problems, io_details, op_histogram, read_tflite

    x_val, val_chunks = val
    reference = model if reference is None else reference
    calib = calibration_set(*train, settings)
    if settings["io_dtype"] == "int8":
        log.warning("convert.io_dtype is int8: the model's inputs and outputs are quantized; "
                    "the firmware must quantize the features with the input scale")
    tflite_bytes = convert_int8(
        model, calib, per_channel=settings["per_channel"], io_dtype=settings["io_dtype"]
    )
    info = read_tflite(tflite_bytes)
    problems = int8_problems(info)
    if problems:
        raise N6QATError(f"the {name} INT8 model is not pure INT8:\n  " + "\n  ".join(problems))
    x_all = np.asarray(x_val, dtype=np.float32)
    int8_scores = run_tflite(tflite_bytes, x_all)  # TFLite's built-in int8 kernels
    xnnpack_scores = run_tflite(tflite_bytes, x_all, kernels="xnnpack")
    fp32_scores = predict(reference, x_all)
    float_scores = fp32_scores if reference is model else predict(model, x_all)
    twin = simulated_int8(model, calib, per_channel=settings["per_channel"])
    simulated = predict(twin, x_all)
    pick = select_representative(
        val_chunks["label_index"].to_numpy(), val_chunks["energy"].to_numpy(),
        settings["validation_size"], 0.0, settings["seed"],
    )
    report = {
        "model": name,
        "size_bytes": len(tflite_bytes),
        "op_histogram": op_histogram(info),
        "io": io_details(info),
        "calibration_chunks": int(len(calib)),
        "validation_chunks": int(len(pick)),
        "per_channel": settings["per_channel"],
        "agreement": agreement(float_scores[pick], int8_scores[pick]),
        "simulation_fidelity": {**agreement(simulated, int8_scores), "samples": len(x_all)},
        # Diagnostic: LiteRT's default XNNPACK int8 kernels against the built-in ones that
        # every score here uses (n6qat.litert); a runtime using XNNPACK differs this much.
        "host_runtime_spread": {**agreement(int8_scores, xnnpack_scores), "samples": len(x_all)},
        "quality": quality(int8_scores, fp32_scores, val_chunks, labels, pooling, threshold),
        "int8_problems": problems,
    }
    log.info("%s INT8: %d bytes\n%s", name, len(tflite_bytes), json.dumps(
        {k: report[k] for k in ("agreement", "simulation_fidelity", "quality")},
        indent=1, default=float))
    write_bytes(out_tflite, tflite_bytes)
    save_validation_npz(out_validation, x_all[pick], float_scores[pick])
    if out_layers is not None:
        from n6qat.layer_fidelity import layer_fidelity

        layers = layer_fidelity(model, tflite_bytes, x_all[pick], max_samples=layer_samples)
        log.info("%s INT8, per tensor:\n%s", name, layers.drop(columns="tensor").to_string())
        write_csv(out_layers, layers)
    if out_weights is not None:
        from n6qat.report_tables import folded_float_kernels, weight_sqnr
        from n6qat.tflite_inspect import tflite_weights

        kernels = folded_float_kernels(model)
        weights = weight_sqnr(kernels, tflite_weights(tflite_bytes))
        log.info("%s INT8 weights: %d of %d float kernels paired\n%s", name, len(weights),
                 len(kernels), weights.to_string(index=False))  # fmt: skip
        write_csv(out_weights, weights)
    write_text(out_report, json.dumps(report, indent=2, default=float) + "\n")
    return report
