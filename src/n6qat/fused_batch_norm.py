"""Float training with every BatchNormalization's batch statistics in one fused op.

In training mode, Keras 3 computes a BatchNormalization from separate ops: mean, squared
difference, variance, normalization, and their gradients. Each is a full-tensor pass, and
together they are about a third of the DS-CNN's pretraining step on CPU. TensorFlow's
FusedBatchNormV3 (oneDNN on CPU) does the forward and the backward in one op each.
`fused_trainer(model)` builds a twin of `model` with `keras.models.clone_model`. The
clone function returns the original layers, so every variable is shared, and wraps each
BatchNormalization in `FusedTrainingBatchNorm`. Training the twin trains `model`, which
keeps its plain layers and is what gets saved.

The math is Keras's, with other rounding (about 1e-6 relative): the output is normalized
with the batch mean and the biased batch variance. The moving statistics follow Keras's
update, from the biased variance (the fused op returns the unbiased one, which is scaled
back). Anything the fused op does not cover goes to the layer itself: inference mode, a
frozen layer, a mask, renorm, an axis other than the last of a 4-D input, or an epsilon
below the op's minimum.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from n6qat.int8_twin import all_layers

MIN_EPSILON = 1.001e-5
"""The smallest epsilon the fused op accepts (TensorFlow raises smaller ones to it)."""


class FusedTrainingBatchNorm(keras.layers.Layer):
    """Runs ``batch_norm`` (sharing its variables), fused in training mode where it can."""

    def __init__(self, batch_norm: keras.layers.BatchNormalization):
        super().__init__(name=f"{batch_norm.name}_fused")
        self.batch_norm = batch_norm

    def fusable(self, inputs, training, mask) -> bool:
        """Whether this call runs the fused op (else the layer itself runs)."""
        bn = self.batch_norm
        axis = bn.axis if isinstance(bn.axis, int) else None
        return bool(
            training
            and bn.trainable
            and mask is None
            and not bn.renorm
            and len(inputs.shape) == 4
            and axis in (-1, 3)
            and bn.epsilon >= MIN_EPSILON
            and inputs.dtype == tf.float32
        )

    def call(self, inputs, training=None, mask=None):
        bn = self.batch_norm
        if not self.fusable(inputs, training, mask):
            return bn(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        gamma = bn.gamma if bn.scale else tf.ones((channels,), inputs.dtype)
        beta = bn.beta if bn.center else tf.zeros((channels,), inputs.dtype)
        outputs, mean, unbiased = tf.compat.v1.nn.fused_batch_norm(
            inputs, gamma, beta, epsilon=bn.epsilon, data_format="NHWC", is_training=True
        )
        count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), inputs.dtype)
        variance = unbiased * ((count - 1.0) / tf.maximum(count, 1.0))
        momentum = bn.momentum
        bn.moving_mean.assign(bn.moving_mean * momentum + mean * (1.0 - momentum))
        bn.moving_variance.assign(bn.moving_variance * momentum + variance * (1.0 - momentum))
        return outputs


def fused_trainer(model: keras.Model) -> keras.Model:
    """A twin of ``model`` sharing all its variables, its BatchNormalizations fused in
    training mode (``model`` itself if it has none)."""
    if not any(isinstance(layer, keras.layers.BatchNormalization) for layer in all_layers(model)):
        return model

    def clone(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            return FusedTrainingBatchNorm(layer)
        return layer

    return keras.models.clone_model(model, clone_function=clone, recursive=True)

