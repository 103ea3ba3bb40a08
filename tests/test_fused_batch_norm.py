"""Fused BatchNormalization training: Keras's math on shared variables, fallbacks exact."""

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers as L  # noqa: E402

from n6qat.fused_batch_norm import FusedTrainingBatchNorm, fused_trainer  # noqa: E402


def _model(center=True, scale=True, momentum=0.9) -> keras.Model:
    keras.utils.set_random_seed(3)
    inputs = keras.Input((3, 4, 2))
    x = L.Conv2D(5, 3, padding="same", name="conv")(inputs)
    x = L.BatchNormalization(momentum=momentum, center=center, scale=scale, name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    x = L.Dense(4, name="dense")(x)
    x = L.BatchNormalization(name="bn_2d")(x)  # 2-D: the layer itself runs
    outputs = L.Activation("sigmoid", name="out")(x)
    model = keras.Model(inputs, outputs)
    bn = model.get_layer("bn")
    rng = np.random.default_rng(0)
    bn.set_weights([rng.normal(size=w.shape).astype(np.float32) ** 2 + 0.5
                    for w in bn.get_weights()])  # fmt: skip
    return model


def _x(n=2):
    # 2 x 3 x 4 = 24 values per channel: the unbiased variance is 24/23 of the biased one.
    return np.random.default_rng(1).normal(1.0, 2.0, size=(n, 3, 4, 2)).astype(np.float32)


def _train_step(net, x):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(net(x, training=True) ** 2)
    return net.trainable_variables, tape.gradient(loss, net.trainable_variables)


def test_trainer_shares_every_variable_in_the_same_order():
    model = _model()
    trainer = fused_trainer(model)
    assert [id(v) for v in trainer.weights] == [id(v) for v in model.weights]
    assert [id(v) for v in trainer.trainable_variables] == [
        id(v) for v in model.trainable_variables
    ]
    wrapped = [layer for layer in trainer.layers if isinstance(layer, FusedTrainingBatchNorm)]
    assert [layer.batch_norm.name for layer in wrapped] == ["bn", "bn_2d"]


@pytest.mark.parametrize("center,scale", [(True, True), (False, False)])
def test_training_matches_keras_outputs_gradients_and_moving_statistics(center, scale):
    reference, fused = _model(center, scale), _model(center, scale)
    trainer = fused_trainer(fused)
    x = _x()
    variables, expected = _train_step(reference, x)
    _, found = _train_step(trainer, x)
    for variable, a, b in zip(variables, expected, found, strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-5, err_msg=variable.path)
    for a, b in zip(reference.non_trainable_weights, fused.non_trainable_weights, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-7, err_msg=a.path)
    moved = reference.get_layer("bn").moving_variance.numpy()
    assert not np.allclose(moved, _model(center, scale).get_layer("bn").moving_variance.numpy())


def test_inference_and_frozen_layers_run_the_layer_itself():
    model = _model()
    trainer = fused_trainer(model)
    x = _x()
    np.testing.assert_array_equal(trainer(x, training=False), model(x, training=False))
    for layer in model.layers:
        layer.trainable = layer.name == "dense"
    reference = _model()
    for layer in reference.layers:
        layer.trainable = layer.name == "dense"
    np.testing.assert_array_equal(trainer(x, training=True), reference(x, training=True))
    np.testing.assert_array_equal(model.get_layer("bn").moving_mean.numpy(),
                                  reference.get_layer("bn").moving_mean.numpy())  # fmt: skip


def test_small_epsilon_and_models_without_batch_norm_are_left_alone():
    inputs = keras.Input((4,))
    plain = keras.Model(inputs, L.Dense(2)(inputs))
    assert fused_trainer(plain) is plain
    model = _model()
    model.get_layer("bn").epsilon = 1e-6
    wrapper = [layer for layer in fused_trainer(model).layers
               if isinstance(layer, FusedTrainingBatchNorm)][0]  # fmt: skip
    assert not wrapper.fusable(tf.zeros((2, 3, 4, 5)), True, None)
