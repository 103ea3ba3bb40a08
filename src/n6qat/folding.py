"""Where the TFLite converter folds a BatchNormalization, and the folded arithmetic.

The converter folds an inference BatchNormalization into the Conv2D / DepthwiseConv2D /
Dense before it when that layer's output is linear and feeds only the BN: the kernel
becomes w * gamma * rsqrt(var + eps) and the bias absorbs the shift. The QAT twin
(`n6qat.int8_twin`) and the weight comparisons in the report use these rules, so both
see the kernels the converter writes.
"""

from __future__ import annotations

import keras
from keras import ops


def is_weight_layer(layer) -> bool:
    return isinstance(
        layer, keras.layers.Conv2D | keras.layers.DepthwiseConv2D | keras.layers.Dense
    )


def _can_fold(layer, batch_norm, rank: int) -> bool:
    """Whether the converter folds `batch_norm` into `layer`: linear output, BN on channels."""
    return (
        is_weight_layer(layer)
        and isinstance(batch_norm, keras.layers.BatchNormalization)
        and layer.activation is keras.activations.linear
        and batch_norm.axis in (-1, rank - 1)
    )


def _add_folds(model: keras.Model, folded_into: dict) -> None:
    """Find conv/dense -> BN pairs whose conv output feeds only that BN."""
    if isinstance(model, keras.Sequential):
        for layer, following in zip(model.layers, model.layers[1:], strict=False):
            nodes = layer._inbound_nodes  # the first is the Sequential model's own call
            if nodes and _can_fold(layer, following, len(nodes[0].outputs[0].shape)):
                folded_into[id(layer)] = following
        return
    nodes = [node for depth in model._nodes_by_depth.values() for node in depth]
    consumers: dict[int, list] = {}
    calls: dict[int, int] = {}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        for tensor in node.input_tensors:
            consumers.setdefault(id(tensor), []).append(node)
    model_outputs = {id(t) for t in model.outputs}
    for node in nodes:
        layer = node.operation
        if not is_weight_layer(layer) or calls[id(layer)] != 1 or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        users = consumers.get(id(out), [])
        if id(out) in model_outputs or len(users) != 1:
            continue
        batch_norm = users[0].operation
        if calls.get(id(batch_norm)) == 1 and _can_fold(layer, batch_norm, len(out.shape)):
            folded_into[id(layer)] = batch_norm


def batch_norm_folds(model: keras.Model) -> dict[int, keras.layers.BatchNormalization]:
    """id(conv/dense layer) -> the BatchNormalization the converter folds into it."""
    folded_into: dict[int, keras.layers.BatchNormalization] = {}
    for sub in [model, *(m for m in _nested_models(model))]:
        _add_folds(sub, folded_into)
    return folded_into


def _nested_models(model: keras.Model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield layer
            yield from _nested_models(layer)


def batch_norm_factor_and_offset(batch_norm: keras.layers.BatchNormalization):
    """Inference BN as y = x * factor + offset, computed as tf.nn.batch_normalization does."""
    factor = ops.rsqrt(batch_norm.moving_variance + batch_norm.epsilon)
    if batch_norm.scale:
        factor = factor * batch_norm.gamma
    offset = -batch_norm.moving_mean * factor
    if batch_norm.center:
        offset = batch_norm.beta + offset
    return factor, offset
