"""The workflow report's figures, drawn from the tables of `n6qat.report_tables` and arrays.

Plot functions take DataFrames, arrays or the stages' JSON dicts and return a matplotlib
Figure on the Agg canvas (no pyplot, no display); `save_figure` writes it as PNG.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from n6qat.atomic import atomic_path
from n6qat.n6 import CPURAM2_BYTES, NPU_BANK_BYTES, NPU_BANKS
from n6qat.names import EVAL_MODELS, short_name
from n6qat.report_tables import KIB, SUMMARY_METRICS, output_agreement

CURVE_LABELS = {
    "loss": "loss", "acc": "accuracy", "auc": "ROC-AUC",
    "int8_file_top1": "INT8 model: validation file top-1",
    "int8_file_cmap": "INT8 model: validation file cmAP",
}
MEMORY_POOLS = {
    "one npuRAM bank, 448 KiB": NPU_BANK_BYTES,
    "four npuRAM banks, 1792 KiB": NPU_BANKS * NPU_BANK_BYTES,
    "npuRAM + cpuRAM2, 2816 KiB": NPU_BANKS * NPU_BANK_BYTES + CPURAM2_BYTES,
}
SQNR_CAP_DB = 80.0  # drawn at most; above it, weights are (nearly) exact
SCATTER_POINTS = 20000  # drawn at most; the statistics use every point


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


def _label_bar_chart(fig, ax, xlabel: str, ylabel: str, title: str, grid: str, columns: int):
    """Axis labels, title and value-axis grid of a one-panel bar chart; its legend below."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis=grid, alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=columns)


# --- summary -------------------------------------------------------------------------------


def plot_summary(summary: pd.DataFrame):
    """Grouped bars of top-1, cmAP, macro F1 and ROC-AUC per model, file and chunk level."""
    fig, axes = new_figure(12, 4.4, panels=2)
    width = 0.8 / max(len(summary), 1)
    for ax, level in zip(axes, ("file", "chunk"), strict=True):
        names = ("top1_accuracy", "cmap", "macro_f1", "macro_roc_auc")
        metrics = [f"{level}_{m}" for m in names if f"{level}_{m}" in summary.columns]
        for i, row in enumerate(summary.to_dict("records")):
            x = np.arange(len(metrics)) + (i - (len(summary) - 1) / 2) * width
            bars = ax.bar(x, [row[m] for m in metrics], width, label=short_name(row["model"]))
            ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
        ticks = [SUMMARY_METRICS[m].split(" ", 1)[1] for m in metrics]
        ax.set_xticks(np.arange(len(metrics)), ticks)
        ax.set_ylim(0, 1.1)
        ax.set_xlabel("metric")
        ax.set_ylabel("score (0–1, higher is better)")
        ax.set_title(f"{level.capitalize()} level, test split")
        ax.grid(axis="y", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=4)
    *others, last = (short_name(m) for m in EVAL_MODELS)
    fig.suptitle(f"Test metrics of {', '.join(others)} and {last}")
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
        diagonal = f"{np.trace(counts)} of {counts.sum()} files on the diagonal"
        ax.set_title(f"{short_name(model)}: {diagonal}")
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
        ax.bar(x, ap.to_numpy(), width, label=f"{short_name(model)} (cmAP {ap.mean():.3f})")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    _label_bar_chart(
        fig,
        ax,
        "class",
        "average precision (file level)",
        "Per-class average precision on the test files",
        grid="y",
        columns=len(models),
    )
    return fig


# --- quantization: outputs -----------------------------------------------------------------


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
    _label_bar_chart(
        fig,
        ax,
        "weight SQNR (dB, higher is better; about 6 dB per bit)",
        "layer (execution order)",
        "Per-layer INT8 weight error: SQNR = 10·log10(‖w‖² / ‖w − Q(w)‖²)",
        grid="x",
        columns=len(tables),
    )
    return fig


# --- quantization: per-tensor fidelity -----------------------------------------------------


def plot_layer_fidelity(tables: Mapping[str, pd.DataFrame]):
    """Cosine and SQNR (dB) of each int8 tensor against its float activation, along the graph.

    `tables` maps a model ("qat" or its display name "QAT-INT8") to its
    `n6qat.layer_fidelity` table; x is the tensor's position in execution order, labelled
    with the Keras layer it stands for. Tensors without a float twin are left out of the
    lines; exact ones (inf dB) are drawn at SQNR_CAP_DB.
    """
    longest = max(tables.values(), key=len)
    fig, (cos_ax, sqnr_ax) = new_figure(max(10.0, 0.36 * len(longest) + 3.0), 5.2, panels=2)
    for model, table in tables.items():
        shown = table[np.isfinite(table["cosine"]) & table["sqnr_db"].notna()]
        worst = shown.loc[shown["sqnr_db"].idxmin()] if len(shown) else None
        where = f", lowest SQNR at {_fidelity_tick(worst)}" if worst is not None else ""
        legend = f"{short_name(model)}{where}"
        cos_ax.plot(shown["order"], shown["cosine"], "-o", ms=3, label=legend)
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


# --- STM32N6 -------------------------------------------------------------------------------


def plot_npu(host_checks: Mapping[str, dict], tool_reports: Mapping[str, dict]):
    """Left: operators on the NPU and the CPU per model. Right: memory against the pools."""
    fig, (ops_ax, memory_ax) = new_figure(12, 4.4, panels=2)
    names = [short_name(m) for m in host_checks]
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
    ax.set_xticks(x, [short_name(m) for m in host_checks])
    ax.set_xlabel("model")
    ax.set_ylabel("KiB (log scale)")
    ax.set_title("Activations against the on-chip RAM pools")
    ax.legend(fontsize=8, loc="center left")
