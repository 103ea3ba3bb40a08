"""The numbers behind the workflow's report: tables computed from the stages' outputs.

Summary differences, float vs INT8 output agreement, per-layer weight SQNR and the
STM32N6 check come out as DataFrames or dicts; `n6qat.report` writes them as HTML and
`n6qat.report_figures` draws them. Nothing here plots.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from n6qat.metrics import METRIC_NAMES, cosine_similarity, sqnr_db
from n6qat.names import short_name

SUMMARY_METRICS = {
    "file_top1_accuracy": "file top-1",
    "file_cmap": "file cmAP",
    "file_macro_f1": "file macro F1",
    "file_macro_roc_auc": "file macro ROC-AUC",
    "chunk_top1_accuracy": "chunk top-1",
    "chunk_cmap": "chunk cmAP",
    "chunk_macro_f1": "chunk macro F1",
    "chunk_macro_roc_auc": "chunk macro ROC-AUC",
    "host_latency_ms_median": "host latency median (ms)",
    "host_latency_ms_p95": "host latency p95 (ms)",
}
# (a, b): the table shows a − b
DELTAS = [
    ("qat_int8", "ptq_int8"),
    ("qat_int8", "fp32"),
    ("ptq_int8", "fp32"),
    ("qat_int8", "qat_fp32"),
]
DELTA_MARK = "Δ "
"""Starts the name of a difference row (the HTML table signs and shades those rows)."""
MISSING = "–"
"""How the report's tables show a value that is missing."""
KIB = 1024


# --- summary -------------------------------------------------------------------------------


def summary_with_deltas(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per model, then the differences QAT-INT8 − PTQ-INT8, QAT-INT8 − FP32, ...

    Columns are the metrics of `summary.csv` under readable names; a difference is left
    out when one of its models is missing.
    """
    metrics = [c for c in SUMMARY_METRICS if c in summary.columns]
    values = summary.set_index("model")[metrics].astype(float)
    deltas = {
        f"{DELTA_MARK}{short_name(a)} − {short_name(b)}": values.loc[a] - values.loc[b]
        for a, b in DELTAS
        if a in values.index and b in values.index
    }
    table = pd.concat([values.rename(index=short_name), pd.DataFrame(deltas).T])
    table.columns = [SUMMARY_METRICS[c] for c in metrics]
    table.index.name = "model"
    return table


# --- quantization: outputs and weights -----------------------------------------------------


def output_agreement(reference: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Cosine, RMSE, largest absolute difference and top-1 agreement of two score arrays."""
    a, b = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    return {
        "cosine": cosine_similarity(a, b),
        "rmse": float(np.sqrt(np.mean((a - b) ** 2))),
        "max_abs": float(np.max(np.abs(a - b))),
        "top1": float(np.mean(a.argmax(axis=1) == b.argmax(axis=1))),
    }


def folded_float_kernels(model) -> dict[str, np.ndarray]:
    """Layer name -> the float kernel the TFLite converter quantizes, in TFLite's layout.

    A BatchNormalization the converter folds (decided as in `n6qat.folding`) is multiplied
    in per output channel. Layouts: Conv2D (out, kh, kw, in), DepthwiseConv2D
    (1, kh, kw, channels), Dense (out, in).
    """
    import keras

    from n6qat.fake_quant import quantization_channel_axis
    from n6qat.folding import batch_norm_folds

    folds = batch_norm_folds(model)
    kernels = {}
    for layer in _weight_layers(model):
        kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
        if id(layer) in folds:
            axis = quantization_channel_axis(layer)
            kernel = kernel * _batch_norm_factor(folds[id(layer)]).reshape(kernel.shape[axis:])
        kernels[layer.name] = _tflite_layout(layer, kernel)
    return kernels


def _weight_layers(model) -> list:
    import keras

    kinds = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found += _weight_layers(layer)
        elif isinstance(layer, kinds):
            found.append(layer)
    return found


def _batch_norm_factor(batch_norm) -> np.ndarray:
    """gamma / sqrt(moving variance + epsilon): the per-channel factor folded into a kernel."""
    import keras

    variance = keras.ops.convert_to_numpy(batch_norm.moving_variance).astype(np.float64)
    factor = 1.0 / np.sqrt(variance + batch_norm.epsilon)
    if batch_norm.scale:
        factor = factor * keras.ops.convert_to_numpy(batch_norm.gamma).astype(np.float64)
    return factor


def _tflite_layout(layer, kernel: np.ndarray) -> np.ndarray:
    import keras

    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw, channels, multiplier = kernel.shape
        return kernel.reshape(1, kh, kw, channels * multiplier)
    if isinstance(layer, keras.layers.Conv2D):
        return kernel.transpose(3, 0, 1, 2)
    return kernel.T


def weight_sqnr(float_kernels: Mapping[str, np.ndarray], int8_weights: list[dict]) -> pd.DataFrame:
    """Per-layer SQNR (dB) of the INT8 weights against the float kernels, in execution order.

    `int8_weights` as `n6qat.tflite_inspect.tflite_weights` gives them. Each int8 tensor
    is paired with the still unpaired float kernel of the same shape that it reproduces
    best, so layer names and order need not agree; a tensor without a same-shape kernel
    is left out.
    """
    unpaired = dict(float_kernels)
    rows = []
    for weight in int8_weights:
        scores = {
            name: sqnr_db(kernel, weight["values"])
            for name, kernel in unpaired.items()
            if kernel.shape == weight["shape"]
        }
        if not scores:
            continue
        layer = max(scores, key=scores.get)
        del unpaired[layer]
        rows.append(
            {
                "layer": layer,
                "op": weight["op"],
                "opcode": weight["opcode"],
                "shape": "x".join(map(str, weight["shape"])),
                "per_channel": weight["per_channel"],
                "sqnr_db": scores[layer],
            }
        )
    return pd.DataFrame(rows, columns=["layer", "op", "opcode", "shape", "per_channel", "sqnr_db"])


# --- STM32N6 -------------------------------------------------------------------------------


def npu_table(host_checks: Mapping[str, dict], tool_reports: Mapping[str, dict]) -> pd.DataFrame:
    """One column per model: where the ops run, memory, MACC, and stedgeai's numbers if found."""
    columns = {
        short_name(model): _npu_column(check, tool_reports.get(model, {}))
        for model, check in host_checks.items()
    }
    return pd.DataFrame(columns).rename_axis("")


def _npu_column(check: dict, tool: dict) -> dict:
    ops = check["operators"]
    cpu = [f"{op['index']} {op['opcode']} ({op['position']})" for op in ops if op["unit"] == "CPU"]
    memory = check["memory"]
    metrics = next(iter((check.get("metrics") or {}).values()), {})
    column = {
        "N6-clean (host check)": "yes" if check["clean"] else "no",
        "errors / warnings": f"{check['error_count']} / {check['warning_count']}",
        "operators on NPU": str(sum(op["unit"] == "NPU" for op in ops)),
        "operators on CPU": str(len(cpu)),
        "CPU operators": ", ".join(cpu) or "none",
        "MACC (host estimate)": f"{check['macc']:,}",
        "weights (host, KiB)": f"{memory['weights_bytes'] / KIB:.1f}",
        "peak activations (host, KiB)": f"{memory['peak_activation_bytes'] / KIB:.1f}",
        "activations fit in": memory["fits"],
        "INT8 vs float cosine (host)": _number(metrics.get("cos"), ".5f"),
        "INT8 vs float l2r (host)": _number(metrics.get("l2r"), ".4f"),
    }
    return column | _stedgeai_rows(tool)


def _number(value, spec: str) -> str:
    """A number as text in the format `spec`; MISSING when there is none."""
    return MISSING if value is None else format(value, spec)


def _stedgeai_rows(tool: dict) -> dict:
    if not tool.get("available"):
        return {"stedgeai": "not found: only the host check ran"}
    head = tool.get("headline") or {}
    epochs = head.get("epochs") or {}
    software_ops = [r["op"] for r in epochs.get("software_ops", [])]
    rows = {
        "stedgeai": f"version {tool.get('version') or '?'}",
        "MACC (stedgeai)": _number(head.get("macc"), ","),
        "weights (stedgeai, KiB)": _number(_kib(head.get("weights_bytes")), ".1f"),
        "activations (stedgeai, KiB)": _number(_kib(head.get("activations_bytes")), ".1f"),
        "epochs HW / SW (stedgeai)": (
            f"{_number(epochs.get('hardware'), 'd')} / {_number(epochs.get('software'), 'd')}"
        ),
        "software epochs' ops (stedgeai)": ", ".join(software_ops) or "none",
    }
    for pool in head.get("memory_pools") or []:
        used, size = _kib(pool.get("used_bytes")), _kib(pool.get("size_bytes"))
        rows[f"pool {pool['name']} used (stedgeai, KiB)"] = (
            f"{_number(used, '.1f')} of {_number(size, '.0f')}"
        )
    for row in head.get("validation") or []:
        metrics = [f"{k} {row[k]:.4g}" for k in METRIC_NAMES if row.get(k) is not None]
        rows[f"validate: {row.get('row', '?')} (stedgeai)"] = ", ".join(metrics) or MISSING
    return rows


def _kib(value) -> float | None:
    return None if value is None else value / KIB
