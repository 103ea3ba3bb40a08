"""Figures and tables of the workflow's HTML report (`snakemake --report`).

Plot functions take DataFrames, arrays or the stages' JSON dicts and return a matplotlib
Figure on the Agg canvas (no pyplot, no display); `save_figure` writes it as PNG.
Tables become small self-contained HTML pages: Snakemake's report shows HTML in a
frame, while it offers CSV only as a download.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from n6qat.atomic import atomic_path
from n6qat.metrics import cosine_similarity, sqnr_db
from n6qat.n6 import CPURAM2_BYTES, METRIC_NAMES, NPU_BANK_BYTES, NPU_BANKS
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
CURVE_LABELS = {
    "loss": "loss", "acc": "accuracy", "auc": "ROC-AUC",
    "int8_file_top1": "INT8 model: validation file top-1",
    "int8_file_cmap": "INT8 model: validation file cmAP",
}
KIB = 1024
MEMORY_POOLS = {
    "one npuRAM bank, 448 KiB": NPU_BANK_BYTES,
    "four npuRAM banks, 1792 KiB": NPU_BANKS * NPU_BANK_BYTES,
    "npuRAM + cpuRAM2, 2816 KiB": NPU_BANKS * NPU_BANK_BYTES + CPURAM2_BYTES,
}
SQNR_CAP_DB = 80.0  # drawn at most; above it, weights are (nearly) exact
SCATTER_POINTS = 20000  # drawn at most; the statistics use every point
WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
_CSS = """
body { font-family: system-ui, sans-serif; font-size: 14px; margin: 1em; color: #222; }
h2 { font-size: 16px; margin: 1em 0 0.5em 0; }
p.note { color: #555; max-width: 60em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
tr.delta td, tr.delta th { background: #eef2ff; font-style: italic; }
pre { background: #f7f7f7; padding: 0.8em; }
"""


def label(model: str) -> str:
    """Short display name of an evaluation model ("qat_int8" -> "QAT-INT8")."""
    return short_name(model)


# --- output --------------------------------------------------------------------------------


def new_figure(width: float, height: float, panels: int = 1):
    """A Figure on the Agg canvas and a list of its `panels` axes, side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, panels, squeeze=False)[0])


def save_figure(fig, path: str | Path) -> None:
    """Write a Figure as PNG (atomically), creating the folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def html_page(title: str, body: str, note: str = "") -> str:
    """A standalone HTML page (inline CSS): the title, an optional note, then `body`."""
    note = f'<p class="note">{html.escape(note)}</p>' if note else ""
    title = html.escape(title)
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head>\n<body><h2>{title}</h2>{note}\n{body}\n</body></html>\n"
    )


def html_table(table: pd.DataFrame, title: str, note: str = "", index: bool = True) -> str:
    """`table` as a standalone HTML page."""
    return html_page(title, table_html(table, index), note)


def table_html(table: pd.DataFrame, index: bool = True) -> str:
    """An HTML table: floats with three decimals (signed in "Δ " rows), missing as a dash."""
    head = ([str(table.index.name or "")] if index else []) + [str(c) for c in table.columns]
    rows = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for name, values in zip(table.index, table.itertuples(index=False), strict=True):
        delta = str(name).startswith(DELTA_MARK)
        first = f"<th>{html.escape(str(name))}</th>" if index else ""
        cells = "".join(f"<td>{_cell(v, delta)}</td>" for v in values)
        shade = ' class="delta"' if delta else ""
        rows.append(f"<tr{shade}>{first}{cells}</tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def _cell(value, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:+.3f}" if signed and round(value, 3) != 0 else f"{abs(value):.3f}"
    return html.escape(str(value))


# --- summary -------------------------------------------------------------------------------


def summary_with_deltas(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per model, then the differences QAT-INT8 − PTQ-INT8, QAT-INT8 − FP32, ...

    Columns are the metrics of `summary.csv` under readable names; a difference is left
    out when one of its models is missing.
    """
    metrics = [c for c in SUMMARY_METRICS if c in summary.columns]
    values = summary.set_index("model")[metrics].astype(float)
    deltas = {
        f"{DELTA_MARK}{label(a)} − {label(b)}": values.loc[a] - values.loc[b]
        for a, b in DELTAS
        if a in values.index and b in values.index
    }
    table = pd.concat([values.rename(index=label), pd.DataFrame(deltas).T])
    table.columns = [SUMMARY_METRICS[c] for c in metrics]
    table.index.name = "model"
    return table


def plot_summary(summary: pd.DataFrame):
    """Grouped bars of top-1, cmAP, macro F1 and ROC-AUC per model, file and chunk level."""
    fig, axes = new_figure(12, 4.4, panels=2)
    width = 0.8 / max(len(summary), 1)
    for ax, level in zip(axes, ("file", "chunk"), strict=True):
        names = ("top1_accuracy", "cmap", "macro_f1", "macro_roc_auc")
        metrics = [f"{level}_{m}" for m in names if f"{level}_{m}" in summary.columns]
        for i, row in enumerate(summary.to_dict("records")):
            x = np.arange(len(metrics)) + (i - (len(summary) - 1) / 2) * width
            bars = ax.bar(x, [row[m] for m in metrics], width, label=label(row["model"]))
            ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
        ticks = [SUMMARY_METRICS[m].split(" ", 1)[1] for m in metrics]
        ax.set_xticks(np.arange(len(metrics)), ticks)
        ax.set_ylim(0, 1.1)
        ax.set_xlabel("metric")
        ax.set_ylabel("score (0–1, higher is better)")
        ax.set_title(f"{level.capitalize()} level, test split")
        ax.grid(axis="y", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=4)
    fig.suptitle("Test metrics of FP32, QAT-FP32, PTQ-INT8 and QAT-INT8")
    return fig


# --- training curves -----------------------------------------------------------------------


CURVE_INT8_METRICS = ("int8_file_top1", "int8_file_cmap")
"""Validation-only metrics of the INT8 simulation that QAT chooses its epoch by."""


def curve_metrics(histories: Iterable[pd.DataFrame]) -> list[str]:
    """The training metrics in any history (loss first), without their val_ twins, then the
    INT8 simulation's validation metrics where recorded."""
    histories = list(histories)
    names = {
        c for h in histories for c in h.columns
        if c not in ("epoch", "selected") and not c.startswith("val_")
    }
    int8 = [m for m in CURVE_INT8_METRICS if any(f"val_{m}" in h.columns for h in histories)]
    return sorted(names, key=lambda n: (n != "loss", n)) + int8


def plot_training_curves(histories: Mapping[str, pd.DataFrame]):
    """Loss and metrics per epoch, training (solid) and validation (dashed), stage after stage.

    `histories` maps a stage name ("pretraining", "QAT") to its history table, in order;
    a later stage's epochs continue the x axis after a dotted line.
    """
    from matplotlib.ticker import MaxNLocator

    metrics = curve_metrics(histories.values()) or ["loss"]
    fig, axes = new_figure(4.2 * len(metrics), 4.2, panels=len(metrics))
    offset = 0
    for n, (stage, history) in enumerate(histories.items()):
        numbers = history["epoch"] if "epoch" in history else np.arange(1, len(history) + 1)
        epochs = offset + np.asarray(numbers)
        for ax, metric in zip(axes, metrics, strict=True):
            if n > 0:
                ax.axvline(offset + 0.5, color="grey", lw=0.8, ls=":")
            if metric in history:
                ax.plot(epochs, history[metric], "-o", ms=3, color=f"C{n}", label=f"{stage} train")
            if f"val_{metric}" in history:
                ax.plot(
                    epochs,
                    history[f"val_{metric}"],
                    "--s",
                    ms=3,
                    color=f"C{n}",
                    label=f"{stage} validation",
                )
                if "selected" in history and history["selected"].any():
                    kept = history["selected"].to_numpy(bool)
                    ax.plot(epochs[kept], history[f"val_{metric}"][kept], "*", ms=11,
                            color=f"C{n}", label=f"{stage} kept epoch")
        offset = int(epochs.max()) if len(epochs) else offset
    for ax, metric in zip(axes, metrics, strict=True):
        ax.set_title(CURVE_LABELS.get(metric, metric))
        ax.set_xlabel("epoch (stages in sequence)")
        ax.set_ylabel(CURVE_LABELS.get(metric, metric))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=4)
    fig.suptitle("Training curves: " + " then ".join(histories))
    return fig


# --- confusion and per-class AP ------------------------------------------------------------


def plot_confusions(confusions: Mapping[str, pd.DataFrame]):
    """Confusion matrices side by side: colour is the share of the true class, text the count."""
    size = max(len(c) for c in confusions.values())
    side = max(4.5, 0.42 * size + 2.2)
    fig, axes = new_figure(side * len(confusions) + 1, side, panels=len(confusions))
    for ax, (model, table) in zip(axes, confusions.items(), strict=True):
        counts = table.to_numpy()
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(counts):
            if count:
                color = "white" if shares[i, j] > 0.6 else "black"
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=color)
        ax.set_xticks(range(counts.shape[1]), table.columns, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(counts.shape[0]), table.index, fontsize=8)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(f"{label(model)}: {np.trace(counts)} of {counts.sum()} files on the diagonal")
    fig.colorbar(image, ax=axes, shrink=0.8, label="share of the true class's files")
    fig.suptitle("Confusion matrices of the test files ((none): no score reaches the threshold)")
    return fig


def plot_per_class_ap(per_class: pd.DataFrame, models: list[str]):
    """Grouped bars of every class's average precision, one bar per model."""
    classes = list(dict.fromkeys(per_class["label"]))
    fig, (ax,) = new_figure(max(7.0, 0.35 * len(classes) * len(models) + 2), 4.4)
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        ap = per_class[per_class["model"] == model].set_index("label")["ap"].reindex(classes)
        x = np.arange(len(classes)) + (i - (len(models) - 1) / 2) * width
        ax.bar(x, ap.to_numpy(), width, label=f"{label(model)} (cmAP {ap.mean():.3f})")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("class")
    ax.set_ylabel("average precision (file level)")
    ax.set_title("Per-class average precision on the test files")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=len(models))
    return fig


# --- quantization: outputs -----------------------------------------------------------------


def output_agreement(reference: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Cosine, RMSE, largest absolute difference and top-1 agreement of two score arrays."""
    a, b = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    return {
        "cosine": cosine_similarity(a, b),
        "rmse": float(np.sqrt(np.mean((a - b) ** 2))),
        "max_abs": float(np.max(np.abs(a - b))),
        "top1": float(np.mean(a.argmax(axis=1) == b.argmax(axis=1))),
    }


def plot_output_scatter(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]]):
    """One panel per (float scores, INT8 scores) pair: every class score of every chunk."""
    fig, axes = new_figure(5.2 * len(pairs), 5.2, panels=len(pairs))
    rng = np.random.default_rng(0)
    for ax, (title, (reference, test)) in zip(axes, pairs.items(), strict=True):
        x, y = np.ravel(reference), np.ravel(test)
        shown = rng.permutation(len(x))[:SCATTER_POINTS]
        ax.scatter(x[shown], y[shown], s=4, alpha=0.35, linewidths=0)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="y = x")
        stats = output_agreement(reference, test)
        text = (
            f"cosine {stats['cosine']:.4f}\nRMSE {stats['rmse']:.4f}\n"
            f"max |Δ| {stats['max_abs']:.3f}\nsame top-1 {100 * stats['top1']:.1f} %"
        )
        ax.text(
            0.03,
            0.97,
            text,
            transform=ax.transAxes,
            va="top",
            fontsize=8,
            bbox={"fc": "white", "alpha": 0.8, "ec": "none"},
        )
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal", title=title)
        ax.set_xlabel("float model score (sigmoid, 0–1)")
        ax.set_ylabel("INT8 TFLite score (sigmoid, 0–1)")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Float vs INT8 outputs on the test chunks ({len(x)} scores per panel)")
    return fig


# --- quantization: weights -----------------------------------------------------------------


def dequantize(codes: np.ndarray, scales, zero_points, axis: int = 0) -> np.ndarray:
    """Float values of an int8 tensor: one scale, or one per index of `axis`."""
    codes = np.asarray(codes, dtype=np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    zero_points = np.asarray(zero_points if len(zero_points) else [0], dtype=np.float64)
    if scales.size > 1:
        shape = [1] * codes.ndim
        shape[axis] = scales.size
        zero_points = np.broadcast_to(zero_points, scales.shape).reshape(shape)
        scales = scales.reshape(shape)
    return (codes - zero_points) * scales


def tflite_weights(model_bytes: bytes) -> list[dict]:
    """The int8 weights of every CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED, dequantized.

    One dict per op, in execution order: op, opcode, tensor (name), shape, per_channel,
    values (float64).
    """
    import tflite

    from n6qat.tflite_inspect import read_tflite

    info = read_tflite(model_bytes)
    model = tflite.Model.GetRootAs(model_bytes, 0)
    weights = []
    for op in info.operators:
        tensor = info.tensors[op.inputs[1]] if len(op.inputs) > 1 else None
        if op.opcode not in WEIGHT_OPS or tensor is None or tensor.dtype != "int8":
            continue
        if not (tensor.is_constant and tensor.scales):
            continue
        raw = _buffer_bytes(model, model_bytes, tensor.index)
        codes = np.frombuffer(raw, dtype=np.int8).reshape(tensor.shape)
        values = dequantize(codes, tensor.scales, tensor.zero_points, tensor.quantized_dimension)
        weights.append(
            {
                "op": op.index,
                "opcode": op.opcode,
                "tensor": tensor.name,
                "shape": tuple(tensor.shape),
                "per_channel": len(tensor.scales) > 1,
                "values": values,
            }
        )
    return weights


def _buffer_bytes(model, data: bytes, tensor_index: int) -> bytes:
    buffer = model.Buffers(model.Subgraphs(0).Tensors(tensor_index).Buffer())
    if buffer.DataLength():
        return buffer.DataAsNumpy().tobytes()
    return data[buffer.Offset() : buffer.Offset() + buffer.Size()]  # models over 2 GB


def folded_float_kernels(model) -> dict[str, np.ndarray]:
    """Layer name -> the float kernel the TFLite converter quantizes, in TFLite's layout.

    A BatchNormalization the converter folds (decided as in `n6qat.qat`) is multiplied
    in per output channel. Layouts: Conv2D (out, kh, kw, in), DepthwiseConv2D
    (1, kh, kw, channels), Dense (out, in).
    """
    import keras

    from n6qat.qat import batch_norm_folds, quantization_channel_axis

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

    Each int8 tensor is paired with the still unpaired float kernel of the same shape that
    it reproduces best, so layer names and order need not agree; a tensor without a
    same-shape kernel is left out.
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


def plot_weight_sqnr(tables: Mapping[str, pd.DataFrame]):
    """Horizontal bars of each layer's weight SQNR (dB), one bar per model (e.g. PTQ, QAT).

    Values above SQNR_CAP_DB (in practice: exact, such as one weight per channel) are
    drawn at the cap and marked.
    """
    layers = list(dict.fromkeys(name for t in tables.values() for name in t["layer"]))
    fig, (ax,) = new_figure(9, max(3.0, 0.2 * len(layers) * len(tables) + 2.0))
    height = 0.8 / max(len(tables), 1)
    for i, (model, table) in enumerate(tables.items()):
        values = table.set_index("layer")["sqnr_db"].reindex(layers)
        y = np.arange(len(layers)) + (i - (len(tables) - 1) / 2) * height
        median = float(np.nanmedian(values)) if values.notna().any() else float("nan")
        bars = ax.barh(
            y,
            values.clip(upper=SQNR_CAP_DB).to_numpy(),
            height,
            label=f"{model} (median {median:.1f} dB)",
        )
        texts = [f"≥ {SQNR_CAP_DB:.0f}" if v > SQNR_CAP_DB else f"{v:.1f}" for v in values]
        ax.bar_label(bars, texts, fontsize=6, padding=2)
    ax.set_xlim(0, SQNR_CAP_DB * 1.1)
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("weight SQNR (dB, higher is better; about 6 dB per bit)")
    ax.set_ylabel("layer (execution order)")
    ax.set_title("Per-layer INT8 weight error: SQNR = 10·log10(‖w‖² / ‖w − Q(w)‖²)")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=len(tables))
    return fig


# --- data ----------------------------------------------------------------------------------


def plot_class_counts(counts: pd.DataFrame, negatives: Iterable[str] = ()):
    """Training files per class before and after upsampling; negative classes hatched."""
    from matplotlib.ticker import MaxNLocator

    negatives = {n.lower() for n in negatives}
    is_negative = [str(n).lower() in negatives for n in counts["label"]]
    fig, (ax,) = new_figure(max(6.0, 0.6 * len(counts) + 2), 4.4)
    x = np.arange(len(counts))
    for offset, column, color in ((-0.2, "before", "C7"), (0.2, "after", "C0")):
        bars = ax.bar(x + offset, counts[column], 0.4, label=f"{column} upsampling", color=color)
        ax.bar_label(bars, fontsize=7, padding=1)
        for bar, negative in zip(bars, is_negative, strict=True):
            bar.set_hatch("//" if negative else "")
    names = [
        f"{n} (negative)" if neg else str(n)
        for n, neg in zip(counts["label"], is_negative, strict=True)
    ]
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_xlabel("class folder")
    ax.set_ylabel("training files")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Training files per class, before and after upsampling")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def rejected_html(rejected: pd.DataFrame, max_rows: int = 500) -> str:
    """The rejected files with their reasons, counted by reason first."""
    if rejected.empty:
        return html_page("Rejected files", "<p>No file was rejected: every file was used.</p>")
    by_reason = rejected["reason"].value_counts().rename_axis("reason").reset_index(name="files")
    note = f"{len(rejected)} files could not be used; the run left them out."
    if len(rejected) > max_rows:
        note += f" The first {max_rows} are listed; results/index/rejected.csv has all."
    body = (
        table_html(by_reason, index=False)
        + "<h2>Files</h2>"
        + table_html(rejected.head(max_rows), index=False)
    )
    return html_page("Rejected files", body, note)


# --- STM32N6 -------------------------------------------------------------------------------


def npu_table(host_checks: Mapping[str, dict], tool_reports: Mapping[str, dict]) -> pd.DataFrame:
    """One column per model: where the ops run, memory, MACC, and stedgeai's numbers if found."""
    columns = {
        f"{model.upper()}-INT8": _npu_column(check, tool_reports.get(model, {}))
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
    return "–" if value is None else format(value, spec)


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
        rows[f"validate: {row.get('row', '?')} (stedgeai)"] = ", ".join(metrics) or "–"
    return rows


def _kib(value) -> float | None:
    return None if value is None else value / KIB


def plot_npu(host_checks: Mapping[str, dict], tool_reports: Mapping[str, dict]):
    """Left: operators on the NPU and the CPU per model. Right: memory against the pools."""
    fig, (ops_ax, memory_ax) = new_figure(12, 4.4, panels=2)
    names = [f"{m.upper()}-INT8" for m in host_checks]
    units = [[op["unit"] for op in c["operators"]] for c in host_checks.values()]
    npu = np.array([u.count("NPU") for u in units])
    cpu = np.array([u.count("CPU") for u in units])
    ops_ax.barh(names, npu, color="C2", label="NPU (Neural-ART)")
    ops_ax.barh(names, cpu, left=npu, color="C3", label="CPU (software)")
    for i, check in enumerate(host_checks.values()):
        cpu_ops = [op["opcode"] for op in check["operators"] if op["unit"] == "CPU"]
        ops_ax.text(
            npu[i] + cpu[i] + 0.3,
            i,
            ", ".join(cpu_ops) or "all on the NPU",
            va="center",
            fontsize=8,
        )
    ops_ax.set_xlim(0, (npu + cpu).max() * 1.7 + 1)
    ops_ax.set_xlabel("operators (host check)")
    ops_ax.set_ylabel("model")
    ops_ax.set_title("Where the operators run")
    ops_ax.legend(fontsize=8, loc="lower right")
    _plot_memory(memory_ax, host_checks, tool_reports)
    fig.suptitle("STM32N6 check: NPU placement and memory")
    return fig


def _plot_memory(ax, host_checks: Mapping[str, dict], tool_reports: Mapping[str, dict]) -> None:
    memory = [check["memory"] for check in host_checks.values()]
    heads = [(tool_reports.get(m) or {}).get("headline") or {} for m in host_checks]
    series = {
        "peak activations (host)": [m["peak_activation_bytes"] for m in memory],
        "activations (stedgeai)": [h.get("activations_bytes") or 0 for h in heads],
        "weights (host; flash)": [m["weights_bytes"] for m in memory],
    }
    if not any(series["activations (stedgeai)"]):
        del series["activations (stedgeai)"]
    x = np.arange(len(host_checks))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        bars = ax.bar(
            x + (i - (len(series) - 1) / 2) * width, np.array(values) / KIB, width, label=name
        )
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    for j, (pool, size) in enumerate(MEMORY_POOLS.items()):
        ax.axhline(size / KIB, color="grey", lw=0.9, ls=("--", "-.", ":")[j % 3])
        ax.text(x[0] - 0.45, size / KIB, pool, ha="left", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(top=2 * max(MEMORY_POOLS.values()) / KIB)
    ax.set_xticks(x, [f"{m.upper()}-INT8" for m in host_checks])
    ax.set_xlabel("model")
    ax.set_ylabel("KiB (log scale)")
    ax.set_title("Activations against the on-chip RAM pools")
    ax.legend(fontsize=8, loc="center left")


# --- config --------------------------------------------------------------------------------


def flatten_config(config: Mapping, prefix: str = "") -> dict[str, str]:
    """A nested config as {"section.key": text}: strings as they are, the rest as JSON."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat |= flatten_config(value, f"{prefix}{key}.")
        else:
            text = value if isinstance(value, str) and value else json.dumps(value, default=str)
            flat[f"{prefix}{key}"] = text
    return flat


def config_html(config: Mapping) -> str:
    """The run's configuration (defaults filled in): a key/value table, then as YAML."""
    import yaml

    table = pd.DataFrame(flatten_config(config).items(), columns=["key", "value"])
    plain = json.loads(json.dumps(config, default=str))
    as_yaml = html.escape(yaml.safe_dump(plain, sort_keys=False))
    body = f"{table_html(table, index=False)}<h2>As YAML</h2><pre>{as_yaml}</pre>"
    return html_page(
        "Configuration of this run", body, "Every key, with the defaults of the schema filled in."
    )


# --- quantization: per-tensor fidelity ---


def plot_layer_fidelity(tables: Mapping[str, pd.DataFrame]):
    """Cosine and SQNR (dB) of each int8 tensor against its float activation, along the graph.

    `tables` maps a model ("ptq", "qat") to its `n6qat.layer_fidelity` table; x is the
    tensor's position in execution order, labelled with the Keras layer it stands for.
    Tensors without a float twin are left out of the lines; exact ones (inf dB) are drawn
    at SQNR_CAP_DB.
    """
    longest = max(tables.values(), key=len)
    fig, (cos_ax, sqnr_ax) = new_figure(max(10.0, 0.36 * len(longest) + 3.0), 5.2, panels=2)
    for model, table in tables.items():
        shown = table[np.isfinite(table["cosine"]) & table["sqnr_db"].notna()]
        worst = shown.loc[shown["sqnr_db"].idxmin()] if len(shown) else None
        where = f", lowest SQNR at {_fidelity_tick(worst)}" if worst is not None else ""
        cos_ax.plot(shown["order"], shown["cosine"], "-o", ms=3, label=f"{label(model)}{where}")
        sqnr_ax.plot(shown["order"], shown["sqnr_db"].clip(upper=SQNR_CAP_DB), "-o", ms=3)
    ticks = [_fidelity_tick(row) for row in longest.to_dict("records")]
    names = ("cosine similarity (1 = same direction)", "SQNR (dB, higher is better)")
    for ax, name in zip((cos_ax, sqnr_ax), names, strict=True):
        ax.set_xticks(longest["order"].to_numpy(), ticks, rotation=60, ha="right", fontsize=7)
        ax.set_xlabel("int8 tensor, in execution order (Keras layer)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    cos_ax.set_ylim(top=1.0005)
    cos_ax.set_title("Cosine of INT8 vs float activation")
    sqnr_ax.set_title("SQNR = 10·log10(‖x‖² / ‖x − x_int8‖²)")
    fig.legend(*cos_ax.get_legend_handles_labels(), loc="outside lower center", ncols=2)
    fig.suptitle("Per-tensor INT8 fidelity: where the INT8 error enters along the graph")
    return fig


def _fidelity_tick(row) -> str:
    """A tensor's tick label: its Keras layer (marked when before the activation), else its op."""
    from n6qat.layer_fidelity import PRE_ACTIVATION

    layer = row["layer"] if isinstance(row["layer"], str) else ""  # a CSV's empty cell: NaN
    if not layer:
        return f"({row['op']})"
    return f"{layer} (pre-act)" if row["compared_with"] == PRE_ACTIVATION else layer
