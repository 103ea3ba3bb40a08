"""Cross-layer equalization of depthwise -> pointwise pairs (Nagel et al., 2019, sec. 4.1).

A pair is DepthwiseConv2D -> [BatchNormalization] -> activation -> Conv2D, each tensor
feeding only the next layer. Output channel i of the depthwise (BN folded in, as the
converter writes it) is divided by s_i = sqrt(r1_i * r2_i) / r2_i and input channel i of
the pointwise is multiplied by s_i, where r1_i and r2_i are the channels' max |w|: both
ranges become sqrt(r1_i * r2_i), which per-tensor int8 weights need most.

The rescaling is exact when the activation is positively homogeneous, f(x / s) * s = f(x)
(ReLU, LeakyReLU). ReLU6 is not: relu6(x / s) * s = clip(x, 0, 6 s), which equals
relu6(x) exactly where x <= 6 * min(1, s). For s >= 1 the channel must never reach 6;
for s < 1 it must stay below 6 s, which is stricter. So a ReLU6 channel whose largest
pre-activation is m is exact iff m <= 6, with s_i raised to max(s_i, m / 6); a channel
that reaches 6 keeps s_i = 1. Where m comes from decides how far "exact" reaches:

- ``relu6="skip"``: ReLU6 pairs are left alone.
- ``relu6="bounded"``: m is the bound the weights prove when the depthwise input comes
  from a clipped ReLU (in [0, c], as every DS-CNN block's input): exact for all inputs.
- ``relu6="checked"``: m is the max seen on the calibration inputs: exact on those
  inputs, not proven elsewhere (a larger input can clip at 6 s_i < 6).

Channels held at 1 or raised to m / 6 can leave a tensor's max/min range ratio wider
than before; the table reports both layers' ratios so that this shows. The scale goes
into the BN's gamma and beta (or the depthwise kernel and bias without a BN), so the
model keeps its layers and the converter folds the same BN. Pairs inside nested models
are not searched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd
from keras import ops

from n6qat.errors import N6QATError
from n6qat.folding import batch_norm_factor_and_offset, batch_norm_folds

RELU6_MODES = ("skip", "bounded", "checked")
TABLE_COLUMNS = (
    "depthwise", "batch_norm", "activation", "pointwise", "mode", "reason", "channels",
    "channels_scaled", "range_ratio_before", "range_ratio_after", "pw_range_ratio_before",
    "pw_range_ratio_after", "max_abs_change",
)  # fmt: skip


@dataclass(frozen=True)
class EqualizationPair:
    """A depthwise -> pointwise pair and what sits between (layers of the given model)."""

    depthwise: keras.layers.DepthwiseConv2D
    batch_norm: keras.layers.BatchNormalization | None
    activation: keras.layers.Layer
    pointwise: keras.layers.Conv2D
    clip: float  # the activation's clip point; inf when positively homogeneous
    input_bound: float | None  # c when the depthwise input lies in [0, c], else None


def _clip_point(layer) -> float | None:
    """inf for a positively homogeneous activation, c for one clipped at c, else None."""
    if isinstance(layer, keras.layers.LeakyReLU):
        return math.inf
    if isinstance(layer, keras.layers.ReLU) and not layer.threshold:
        return math.inf if layer.max_value is None else float(layer.max_value)
    if isinstance(layer, keras.layers.Activation):
        return {keras.activations.relu: math.inf, keras.activations.relu6: 6.0}.get(
            layer.activation
        )
    return None


def _output_bound(layer) -> float | None:
    """c when the layer's output always lies in [0, c] (a clipped ReLU), else None."""
    clip = _clip_point(layer)
    leaky = isinstance(layer, keras.layers.LeakyReLU) or getattr(layer, "negative_slope", 0)
    return clip if clip is not None and math.isfinite(clip) and not leaky else None


def _neighbours(model: keras.Model) -> tuple[dict[int, object], dict[int, object]]:
    """id(layer) -> its only consumer, and id(layer) -> the producer of its only input.

    Only layers called once with one output; a layer whose output is a model output or
    feeds several layers has no entry in the first dict.
    """
    if isinstance(model, keras.Sequential):
        chain = model.layers
        return (
            {id(a): b for a, b in zip(chain, chain[1:], strict=False)},
            {id(b): a for a, b in zip(chain, chain[1:], strict=False)},
        )
    nodes = [node for depth in model._nodes_by_depth.values() for node in depth]
    calls: dict[int, int] = {}
    made_by: dict[int, object] = {}
    users: dict[int, list] = {}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        made_by |= {id(t): node.operation for t in node.outputs}
        for tensor in node.input_tensors:
            users.setdefault(id(tensor), []).append(node.operation)
    model_outputs = {id(t) for t in model.outputs}
    following, preceding = {}, {}
    for node in nodes:
        layer = node.operation
        if calls[id(layer)] != 1 or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        after = users.get(id(out), [])
        if id(out) not in model_outputs and len(after) == 1 and calls[id(after[0])] == 1:
            following[id(layer)] = after[0]
        if len(node.input_tensors) == 1 and id(node.input_tensors[0]) in made_by:
            preceding[id(layer)] = made_by[id(node.input_tensors[0])]
    return following, preceding


def find_pairs(model: keras.Model) -> list[EqualizationPair]:
    """The model's depthwise -> [BN] -> activation -> Conv2D chains (top level only)."""
    if not isinstance(model, keras.Sequential) and not hasattr(model, "_nodes_by_depth"):
        raise N6QATError(
            f"equalization needs a functional or Sequential Keras model; got "
            f"{type(model).__name__}. Build the model with the functional API."
        )
    following, preceding = _neighbours(model)
    folds = batch_norm_folds(model)
    pairs = []
    for depthwise in model.layers:
        if not isinstance(depthwise, keras.layers.DepthwiseConv2D):
            continue
        if depthwise.activation is not keras.activations.linear:
            continue
        batch_norm = folds.get(id(depthwise))
        activation = following.get(id(batch_norm if batch_norm else depthwise))
        pointwise = following.get(id(activation))
        clip = _clip_point(activation)
        if clip is None or type(pointwise) is not keras.layers.Conv2D or pointwise.groups != 1:
            continue
        producer = preceding.get(id(depthwise))
        bound = _output_bound(producer) if producer is not None else None
        pairs.append(EqualizationPair(depthwise, batch_norm, activation, pointwise, clip, bound))
    return pairs


def folded_depthwise(pair: EqualizationPair) -> tuple[np.ndarray, np.ndarray]:
    """The depthwise kernel (kh, kw, C*M) and bias (C*M,) with the BN folded in."""
    dw = pair.depthwise
    kernel = ops.convert_to_numpy(dw.kernel)
    kernel = kernel.reshape(*kernel.shape[:2], -1).astype(np.float64)
    bias = ops.convert_to_numpy(dw.bias).astype(np.float64) if dw.use_bias else 0.0
    if pair.batch_norm is None:
        return kernel, np.broadcast_to(bias, kernel.shape[-1:]).copy()
    factor, offset = (ops.convert_to_numpy(v) for v in batch_norm_factor_and_offset(
        pair.batch_norm))  # fmt: skip
    return kernel * factor, bias * factor + offset


def _channel_ranges(pair: EqualizationPair) -> tuple[np.ndarray, np.ndarray]:
    """r1 (folded depthwise output channels) and r2 (pointwise input channels), max |w|."""
    r1 = np.abs(folded_depthwise(pair)[0]).max(axis=(0, 1))
    r2 = np.abs(ops.convert_to_numpy(pair.pointwise.kernel)).max(axis=(0, 1, 3))
    return r1, r2.astype(np.float64)


def range_ratio(ranges: np.ndarray) -> float:
    """max / min over the channels that are not all zero; nan when none is."""
    live = ranges[ranges > 0]
    return float(live.max() / live.min()) if live.size else math.nan


def _scales(pair: EqualizationPair, preact_max: np.ndarray | None):
    """Per-channel s and the channels left at 1 because they can reach the clip.

    The paper's s where the activation is homogeneous; for a clipped one, channels whose
    pre-activation max m stays <= clip get max(s, m / clip), the others 1.
    """
    r1, r2 = _channel_ranges(pair)
    live = (r1 > 0) & (r2 > 0)
    s = np.where(live, np.sqrt(r1 * r2) / np.where(live, r2, 1.0), 1.0)
    if math.isinf(pair.clip):
        return s, np.zeros(s.shape, bool)
    clips = preact_max > pair.clip
    return np.where(live & ~clips, np.maximum(s, preact_max / pair.clip), 1.0), clips


def _proven_preact_max(pair: EqualizationPair) -> np.ndarray:
    """The largest pre-activation any input in [0, input_bound] can give, per channel."""
    kernel, bias = folded_depthwise(pair)
    return pair.input_bound * np.clip(kernel, 0.0, None).sum(axis=(0, 1)) + bias


def _batches(calibration: np.ndarray, batch_size: int):
    for start in range(0, len(calibration), batch_size):
        yield calibration[start : start + batch_size]


def _preact_max(model, pairs, calibration, batch_size) -> list[np.ndarray]:
    """Per pair, the per-channel max of the activation's input on the calibration data."""
    extractor = keras.Model(model.inputs, [p.activation.input for p in pairs])
    highest = [np.full(p.pointwise.kernel.shape[2], -np.inf) for p in pairs]
    for batch in _batches(calibration, batch_size):
        outputs = extractor([batch], training=False)
        for i, out in enumerate(outputs if len(pairs) > 1 else [outputs]):
            out = ops.convert_to_numpy(out)
            highest[i] = np.maximum(highest[i], out.reshape(-1, out.shape[-1]).max(axis=0))
    return highest


def _max_abs_changes(model, clone, names, calibration, batch_size) -> list[float]:
    """Per pair, max |pointwise output change| on the calibration data, earlier pairs applied."""
    before = keras.Model(model.inputs, [model.get_layer(n).output for n in names])
    after = keras.Model(clone.inputs, [clone.get_layer(n).output for n in names])
    change = np.zeros(len(names))
    for batch in _batches(calibration, batch_size):
        a, b = before([batch], training=False), after([batch], training=False)
        a, b = (a, b) if len(names) > 1 else ([a], [b])
        change = np.maximum(change, [
            float(np.max(np.abs(ops.convert_to_numpy(x) - ops.convert_to_numpy(y))))
            for x, y in zip(a, b, strict=True)
        ])  # fmt: skip
    return [float(c) for c in change]


def _apply(clone: keras.Model, pair: EqualizationPair, s: np.ndarray) -> None:
    """Divide the clone's depthwise channel i by s_i, multiply pointwise input i by s_i."""
    if pair.batch_norm is not None:
        bn = clone.get_layer(pair.batch_norm.name)
        bn.gamma.assign(ops.convert_to_numpy(bn.gamma) / s)
        if bn.center:
            bn.beta.assign(ops.convert_to_numpy(bn.beta) / s)
    else:
        dw = clone.get_layer(pair.depthwise.name)
        kernel = ops.convert_to_numpy(dw.kernel)
        dw.kernel.assign((kernel.reshape(*kernel.shape[:2], -1) / s).reshape(
            kernel.shape))  # fmt: skip
        if dw.use_bias:
            dw.bias.assign(ops.convert_to_numpy(dw.bias) / s)
    pw = clone.get_layer(pair.pointwise.name)
    pw.kernel.assign(ops.convert_to_numpy(pw.kernel) * s[None, None, :, None])


def _skip_reason(pair: EqualizationPair, relu6: str) -> str:
    """Why the pair is left alone, or "" when it is equalized."""
    if pair.batch_norm is not None and not pair.batch_norm.scale:
        return "BN without gamma: no exact place for the scale"
    if math.isinf(pair.clip):
        return ""
    if relu6 == "skip":
        return f"activation clips at {pair.clip:g}: rescaling not exact (relu6='skip')"
    if relu6 == "bounded" and pair.input_bound is None:
        return "depthwise input not bounded by a clipped ReLU: no proven bound"
    return ""


def _in(clone: keras.Model, pair: EqualizationPair) -> EqualizationPair:
    """The same pair made of the clone's layers."""
    layers = (pair.depthwise, pair.batch_norm, pair.activation, pair.pointwise)
    found = (clone.get_layer(layer.name) if layer is not None else None for layer in layers)
    return EqualizationPair(*found, pair.clip, pair.input_bound)


def _equalize(clone, pair: EqualizationPair, relu6: str, seen_max) -> dict:
    """Equalize one pair in the clone; its table row (without max_abs_change)."""
    reason = _skip_reason(pair, relu6)
    r1_before, r2_before = _channel_ranges(pair)
    s = np.ones_like(r1_before)
    if reason:
        mode = "skipped"
    elif math.isinf(pair.clip):
        mode, (s, _) = "exact", _scales(pair, None)
    else:
        proven = relu6 == "bounded"
        mode = "bounded" if proven else "data-checked"
        s, clips = _scales(pair, _proven_preact_max(pair) if proven else seen_max)
        if clips.any():
            reason = f"{int(clips.sum())} of {s.size} channels reach the clip: left unscaled"
    if mode != "skipped":
        _apply(clone, pair, s.astype(np.float32))
    r1_after, r2_after = _channel_ranges(_in(clone, pair))
    return {
        "depthwise": pair.depthwise.name,
        "batch_norm": pair.batch_norm.name if pair.batch_norm is not None else "",
        "activation": pair.activation.name, "pointwise": pair.pointwise.name,
        "mode": mode, "reason": reason, "channels": int(s.size),
        "channels_scaled": int(np.sum(s != 1.0)),
        "range_ratio_before": range_ratio(r1_before), "range_ratio_after": range_ratio(r1_after),
        "pw_range_ratio_before": range_ratio(r2_before),
        "pw_range_ratio_after": range_ratio(r2_after),
    }  # fmt: skip


def equalize_pairs(
    model: keras.Model,
    calibration: np.ndarray | None = None,
    relu6: str = "skip",
    batch_size: int = 64,
) -> tuple[keras.Model, pd.DataFrame]:
    """A clone of `model` with its depthwise -> pointwise pairs equalized, and a table.

    The original is not changed. `relu6` picks how clipped activations are handled
    (module docstring); "checked" needs `calibration` (model inputs). One row per pair:
    max/min over channels of the folded depthwise output ranges and of the pointwise
    input ranges, before and after, and max_abs_change, the largest change of the
    pointwise output on `calibration` with this and earlier pairs equalized (nan
    without calibration).
    """
    if relu6 not in RELU6_MODES:
        raise N6QATError(f"equalize: relu6 must be one of {RELU6_MODES}, got {relu6!r}")
    if relu6 == "checked" and calibration is None:
        raise N6QATError("equalize: relu6='checked' needs calibration inputs; none were given")
    pairs = find_pairs(model)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    checked = [p for p in pairs if not _skip_reason(p, relu6) and not math.isinf(p.clip)]
    seen = {}
    if relu6 == "checked" and checked:
        seen = dict(zip(map(id, checked), _preact_max(model, checked, calibration, batch_size),
                        strict=True))  # fmt: skip
    rows = [_equalize(clone, pair, relu6, seen.get(id(pair))) for pair in pairs]
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    if pairs:
        names = [p.pointwise.name for p in pairs]
        table["max_abs_change"] = (
            _max_abs_changes(model, clone, names, calibration, batch_size)
            if calibration is not None else math.nan
        )  # fmt: skip
    return clone, table
