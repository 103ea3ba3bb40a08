"""The DS-CNN classifier built from N6-friendly layers, and loading/checking checkpoints."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from n6qat.atomic import atomic_path, write_text
from n6qat.errors import N6QATError
from n6qat.features import FeatureSettings, mel_basis
from n6qat.keras_file import keras_file_problem

# Piecewise-linear magnitude compression (a log-like curve) as ReLU branches: knots and slopes.
PWL_KNOTS = (0.0, 0.01, 0.05, 0.2)
PWL_SLOPES = (30.0, 8.0, 2.0, 0.5)


def round_channels(n: float, multiple: int = 8) -> int:
    """Channel count rounded to a multiple of 8, the NPU's vector width."""
    return max(multiple, int(round(n / multiple)) * multiple)


def build_dscnn(
    settings: FeatureSettings,
    n_classes: int,
    width: float = 1.0,
    depth: int = 4,
    dropout: float = 0.2,
    seed: int = 0,
):
    """A depthwise-separable CNN on (bins, frames, 1) inputs, sigmoid outputs.

    Only layers the Neural-ART NPU runs natively: Conv2D, DepthwiseConv2D,
    BatchNormalization, ReLU6, Add, global average pooling, Dense. For linear STFT
    input the first layers mix the bins to mels (1x1 conv initialised from a Slaney mel
    basis, trainable) and compress magnitudes with a piecewise-linear ReLU curve.
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(settings.input_shape, name="spectrogram")
    x = _frontend(inputs, settings) if settings.kind == "linear" else inputs
    x = _conv_bn_relu(x, round_channels(16 * width), 3, 2, "stem")
    channels = round_channels(16 * width)
    for i in range(depth):
        out = round_channels(16 * width * 2 ** min(i + 1, 3))
        x = _ds_block(x, channels, out, stride=2 if i < 3 else 1, name=f"block{i}")
        x = _ds_block(x, out, out, stride=1, name=f"block{i}b")
        channels = out
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(n_classes, activation="sigmoid", name="classifier")(x)
    return keras.Model(inputs, outputs, name="dscnn")


def _frontend(x, settings: FeatureSettings):
    """Mel mixing (1x1 conv over the frequency axis) and PWL magnitude compression."""
    import keras
    from keras import layers

    basis = mel_basis(settings)  # (mels, bins)
    x = layers.Permute((3, 2, 1), name="bins_last")(x)  # (1, frames, bins)
    mixer = layers.Conv2D(
        settings.n_mels, 1, use_bias=False, name="mel_mixer",
        kernel_initializer=keras.initializers.Constant(basis.T[None, None] * 8.0),
    )
    x = layers.Permute((3, 2, 1), name="mels_first")(mixer(x))  # (mels, frames, 1)
    knots = np.array(PWL_KNOTS, dtype=np.float32)
    slopes = np.array(PWL_SLOPES, dtype=np.float32)
    coeffs = np.diff(slopes, prepend=0.0).astype(np.float32)
    x = layers.Conv2D(
        len(knots), 1, name="pwl_knots",
        kernel_initializer=keras.initializers.Constant(np.ones((1, 1, 1, len(knots)))),
        bias_initializer=keras.initializers.Constant(-knots),
    )(x)
    x = layers.ReLU(name="pwl_relu")(x)
    x = layers.Conv2D(
        1, 1, use_bias=False, name="pwl_sum",
        kernel_initializer=keras.initializers.Constant(coeffs.reshape(1, 1, -1, 1)),
    )(x)
    return layers.BatchNormalization(name="frontend_bn")(x)


def _conv_bn_relu(x, filters: int, kernel: int, stride: int, name: str):
    from keras import layers

    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                      name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu")(x)


def _ds_block(x, channels: int, out: int, stride: int, name: str):
    """Depthwise 3x3 + pointwise 1x1, each with BN and ReLU6; residual when shapes match."""
    from keras import layers

    y = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False,
                               name=f"{name}_dw")(x)
    y = layers.BatchNormalization(name=f"{name}_dw_bn")(y)
    y = layers.ReLU(6.0, name=f"{name}_dw_relu")(y)
    y = layers.Conv2D(out, 1, use_bias=False, name=f"{name}_pw")(y)
    y = layers.BatchNormalization(name=f"{name}_pw_bn")(y)
    if stride == 1 and channels == out:
        y = layers.Add(name=f"{name}_add")([x, y])
    return layers.ReLU(6.0, name=f"{name}_relu")(y)


def load_model(path: Path, safe_mode: bool = True):
    """Load a ``.keras`` checkpoint, with Keras' safe mode on unless the user opted out.

    Safe mode refuses Lambda layers that would run code stored in the file. BirdNET-STM32
    frontend layers are built in the weight layout the file has (`n6qat.birdnet`). A file
    that is no Keras checkpoint is named with what it is instead (`n6qat.keras_file`).
    """
    import keras

    from n6qat.birdnet import checkpoint_layout  # also registers BirdNET-STM32's layers

    path = Path(path)
    problem = keras_file_problem(path)
    if problem:
        raise N6QATError(f"the model {path} {problem}.")
    try:
        with checkpoint_layout(path):
            return keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
    except Exception as exc:  # Keras raises many types; the user needs the message
        if safe_mode and "Lambda" in str(exc):
            raise N6QATError(
                f"the model {path} holds a Lambda layer, whose Python code Keras' safe mode "
                "refuses to run. Replace the Lambda layer with built-in layers and save the "
                "model again, or set model.safe_mode: false if you trust the file's source."
            ) from exc
        raise N6QATError(f"could not load the model {path}: {exc}") from exc


def check_input_shape(model, settings: FeatureSettings, source: str) -> None:
    """The model must take the features' (bins, frames, 1) input."""
    expected = tuple(settings.input_shape)
    got = tuple(model.input_shape[1:])
    if got != expected:
        raise N6QATError(
            f"{source} expects inputs of shape {got}, but the features are {expected} "
            f"(features.kind={settings.kind}, n_fft={settings.n_fft}, "
            f"spec_width={settings.spec_width}, n_mels={settings.n_mels}). Set the features "
            "section of the config to the model's settings, or give the checkpoint's sidecar JSON."
        )


def check_labels(model_labels: Sequence[str], data_labels: Sequence[str], source: str) -> None:
    """Stop with the differences when the model's classes are not the dataset's."""
    if list(model_labels) == list(data_labels):
        return
    missing = sorted(set(data_labels) - set(model_labels))
    extra = sorted(set(model_labels) - set(data_labels))
    order = "" if missing or extra else " (same classes, different order)"
    raise N6QATError(
        f"{source}: the model's classes differ from the dataset's{order}.\n"
        f"  in the data, not in the model: {missing or '-'}\n"
        f"  in the model, not in the data: {extra or '-'}\n"
        "Set model.replace_head: true to swap the classifier head for the dataset's classes."
    )


def output_units(model) -> int:
    return int(model.output_shape[-1])


def predict(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``model``'s float32 outputs on ``x`` in inference mode, ``batch_size`` rows at a time.

    The same graph and the same numbers as ``model.predict``, traced once: Keras traces
    its predict step for the first batch's shape and again for a shorter last batch (for
    the INT8 twin that second trace is about a second). The function stays on the model
    and serves every later call with the same row shape.
    """
    import tensorflow as tf

    from n6qat.fake_quant import branch_plan, planned_branches

    x = np.asarray(x, dtype=np.float32)
    # In __dict__: an attribute set the usual way would be tracked by Keras as model state.
    traced = model.__dict__.setdefault("_n6qat_predict_functions", {})
    # An INT8 twin's function is traced with the branches its current ranges take
    # (`n6qat.fake_quant.planned_branches`): one function per shape and plan.
    key = (x.shape[1:], branch_plan(model))
    if key not in traced:
        spec = tf.TensorSpec((None, *x.shape[1:]), tf.float32)
        traced[key] = tf.function(
            lambda batch: model(batch, training=False), input_signature=[spec]
        )
    step = traced[key]
    if len(x) == 0:
        return np.zeros((0, *model.outputs[0].shape[1:]), np.float32)
    with planned_branches():
        return np.concatenate(
            [np.asarray(step(x[start : start + batch_size]), np.float32)
             for start in range(0, len(x), batch_size)]
        )  # fmt: skip


def replace_head(model, n_classes: int, seed: int = 0):
    """The same network with a new sigmoid Dense head for ``n_classes`` classes."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    head = model.layers[-1]
    if not isinstance(head, layers.Dense):
        raise N6QATError(
            f"model.replace_head: the last layer {head.name!r} is a {type(head).__name__}, "
            "not a Dense classifier; replace the head yourself before QAT."
        )
    # The head's input in this model's own graph: a layer shared with another model (an
    # unfolded BirdNET frontend reuses the checkpoint's layers) has one node per graph.
    nodes = [n for depth in model._nodes_by_depth.values() for n in depth if n.operation is head]
    features = nodes[0].input_tensors[0]
    outputs = layers.Dense(n_classes, activation="sigmoid", name="classifier_new")(features)
    return keras.Model(model.inputs, outputs, name=model.name)


SAVED_DATE = "1980-01-01@00:00:00"
"""The save date written into every .keras file: the same weights give the same bytes."""


def save_model(model, path: Path) -> None:
    """Save atomically (a temporary file in the same folder, then a rename), reproducibly.

    Keras stamps the save time into ``metadata.json`` and the zip entries; both are
    replaced by fixed values so that two runs with the same weights give the same file.
    """
    import zipfile

    with atomic_path(path) as tmp:
        model.save(tmp)
        with zipfile.ZipFile(tmp) as saved:
            entries = [(info.filename, saved.read(info)) for info in saved.infolist()]
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as fixed:
            for name, data in entries:
                if name == "metadata.json":
                    metadata = json.loads(data)
                    metadata["date_saved"] = SAVED_DATE
                    data = json.dumps(metadata).encode()
                elif name == "config.json":
                    data = json.dumps(_renumbered_shared_objects(json.loads(data))).encode()
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                fixed.writestr(info, data)


def _renumbered_shared_objects(config, ids: dict | None = None):
    """The config with Keras's ``shared_object_id`` values (Python object ids, new in every
    process) replaced by 1, 2, ... in order of appearance; sharing is kept."""
    ids = {} if ids is None else ids
    if isinstance(config, dict):
        return {
            key: ids.setdefault(value, len(ids) + 1) if key == "shared_object_id"
            else _renumbered_shared_objects(value, ids)
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [_renumbered_shared_objects(value, ids) for value in config]
    return config


def read_labels(path: Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, default=float) + "\n")


def checkpoint_labels_file(checkpoint: Path, labels_file: str = "") -> Path | None:
    """The checkpoint's labels file: the given one, else ``<stem>_labels.txt`` beside it."""
    checkpoint = Path(checkpoint)
    if labels_file:
        if not Path(labels_file).is_file():
            raise N6QATError(
                f"model.labels: no such file {labels_file}; name the checkpoint's labels file "
                "(one class a line, in output order) or leave model.labels empty"
            )
        return Path(labels_file)
    candidate = checkpoint.with_name(checkpoint.stem + "_labels.txt")
    return candidate if candidate.is_file() else None


def prepare_pretrained(
    checkpoint: Path,
    data_labels: list[str],
    settings: FeatureSettings,
    labels_file: str = "",
    safe_mode: bool = True,
    replace: bool = False,
    seed: int = 0,
    train_frontend: bool = True,
):
    """Load and check a checkpoint against the features and the dataset's classes.

    A BirdNET-STM32 frontend layer is checked against the features and rebuilt from
    plain Keras layers (QAT then quantizes its convolutions like any other; with
    ``train_frontend`` false they stay frozen).

    Returns ``(model, info, head_replaced)``; with ``replace`` a class mismatch swaps
    the head instead of stopping (the caller then trains the new head).
    """
    checkpoint = Path(checkpoint)
    model = load_model(checkpoint, safe_mode=safe_mode)
    check_input_shape(model, settings, f"the model {checkpoint}")
    model = plain_frontend(model, settings, f"the model {checkpoint}", train_frontend)
    units = output_units(model)
    found = checkpoint_labels_file(checkpoint, labels_file)
    labels = read_labels(found) if found else None
    if labels is None and units == len(data_labels):
        labels = list(data_labels)  # no labels file: the dataset's order is assumed
    if labels is None and not replace:
        raise N6QATError(
            f"the model {checkpoint} has {units} outputs but data.train has "
            f"{len(data_labels)} classes ({', '.join(data_labels)}), and no labels file "
            "names the model's classes. Set model.replace_head: true to train a new head "
            f"for the dataset's classes, or give the model's labels ({checkpoint.stem}"
            "_labels.txt beside it, or model.labels)."
        )
    labels = labels or [f"<output {i}>" for i in range(units)]
    if len(labels) != units:
        raise N6QATError(
            f"the labels file {found} lists {len(labels)} classes but the model {checkpoint} "
            f"has {units} outputs: it must list the model's classes one a line, in output "
            "order (model.labels names the file)."
        )
    replaced = False
    try:
        check_labels(labels, data_labels, f"the model {checkpoint}")
    except N6QATError:
        if not replace:
            raise
        model = replace_head(model, len(data_labels), seed)
        replaced = True
    info = {
        "source": str(checkpoint),
        "model_labels": labels,
        "labels": list(data_labels),
        "head_replaced": replaced,
        "input_shape": list(model.input_shape[1:]),
        "parameters": int(model.count_params()),
    }
    return model, info, replaced


def plain_frontend(model, settings: FeatureSettings, source: str, trainable: bool = True):
    """The model with a BirdNET-STM32 ``AudioFrontendLayer`` unfolded into plain layers."""
    from n6qat import birdnet

    if not any(isinstance(layer, birdnet.AudioFrontendLayer) for layer in model.layers):
        return model
    birdnet.check_sidecar(model, settings.to_dict(), source)
    return birdnet.unfold_frontend(model, trainable=trainable)
