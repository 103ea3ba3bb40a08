"""BirdNET-STM32 checkpoints: their frontend layers, re-implemented, and their sidecar JSON.

BirdNET-STM32 (github.com/birdnet-team/birdnet-stm32) saves `.keras` models whose first
layer is a custom `AudioFrontendLayer`, with a `<stem>_model_config.json` sidecar and a
`<stem>_labels.txt`. The classes here load such files without BirdNET-STM32's code and
compute the same function, for the modes `hybrid` (linear STFT magnitude in, 1x1 mel
mixer, ReLU, magnitude scaling) and `precomputed` (mel spectrogram in, passed through),
with magnitude scaling `pwl` (1x1 depthwise branches, ReLU, Add) or `none`.

Two weight layouts exist. Before BirdNET-STM32 commit 2b523c6 (16 April 2026) the
frontend holds the PWL branches itself ("legacy"); from then on they sit in a nested
`MagnitudeScalingLayer` ("current"), and from 35c747a (17 April 2026) the hybrid path
divides the mel energies by their per-sample maximum before scaling. The layer configs
are identical, so `checkpoint_layout` reads the layout from the weights file while a
model loads.
`unfold_frontend` rewrites a loaded model's frontend as plain Keras layers, which QAT
quantizes and the converter maps one to one.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
from keras import ops

from n6qat.errors import N6QATError
from n6qat.features import PWL_MINMAX_KNOTS, PWL_MINMAX_SLOPES
from n6qat.sidecar import (  # noqa: F401  (re-exported: the sidecar API lives there)
    BIRDNET_FMIN,
    MAGNITUDE_SCALES,
    SIDECAR_FRONTENDS,
    SIDECAR_KEYS,
    read_sidecar,
    require_supported,
    sidecar_path,
)

FRONTEND_MODES = ("hybrid", "precomputed")
LAYOUTS = ("legacy", "current")
PEAK_EPSILON = 1e-6
_LAYOUT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "n6qat_birdnet_layout", default=None
)
_FRONTEND_GROUP = re.compile(r"(^|/)audio_frontend_layer(_\d+)?$")


def weight_layout(path: Path) -> str | None:
    """'legacy' or 'current' for a `.keras` file holding an AudioFrontendLayer, else None."""
    try:
        with zipfile.ZipFile(path) as archive:
            data = archive.read("model.weights.h5")
    except (OSError, KeyError, zipfile.BadZipFile):
        return None
    import h5py

    names: list[str] = []
    with h5py.File(io.BytesIO(data), "r") as h5:
        h5.visit(names.append)
    frontends = [name for name in names if _FRONTEND_GROUP.search(name)]
    if not frontends:
        return None
    nested = any(f"{name}/mag_layer" in names for name in frontends)
    return "current" if nested else "legacy"


@contextlib.contextmanager
def checkpoint_layout(path: Path) -> Iterator[str | None]:
    """While a model loads from `path`, build its frontend layers in the file's layout."""
    token = _LAYOUT.set(weight_layout(path))
    try:
        yield _LAYOUT.get()
    finally:
        _LAYOUT.reset(token)


def _pwl_layers(prefix: str, trainable: bool):
    """The PWL branches at BirdNET-STM32's initial values: y = k0 x + sum k_i relu(x - t_i)."""
    from keras.initializers import Constant

    def depthwise(name: str, value: float, bias: float | None = None):
        return keras.layers.DepthwiseConv2D(
            (1, 1), padding="same", use_bias=bias is not None,
            depthwise_initializer=Constant(value),
            bias_initializer=Constant(0.0 if bias is None else bias),
            name=f"{prefix}_{name}", trainable=trainable,
        )

    k0 = depthwise("pwl_k0_dw", PWL_MINMAX_SLOPES[0])
    shifts = [depthwise(f"pwl_shift{i}_dw", 1.0, -t) for i, t in enumerate(PWL_MINMAX_KNOTS, 1)]
    slopes = [depthwise(f"pwl_k{i}_dw", k) for i, k in enumerate(PWL_MINMAX_SLOPES[1:], 1)]
    return k0, shifts, slopes


def _apply_pwl(x, k0, shifts, slopes):
    y = k0(x)
    for shift, slope in zip(shifts, slopes, strict=True):
        y = ops.add(y, slope(ops.relu(shift(x))))
    return y


class MagnitudeScalingLayer(keras.layers.Layer):
    """BirdNET-STM32's channel-wise magnitude scaling (`pwl` or `none`) on (B, H, W, C)."""

    def __init__(self, method="none", channels=64, pcen_K=8, is_trainable=False,
                 name="mag_scale", **kwargs):
        super().__init__(name=name, **kwargs)
        require_supported("MagnitudeScalingLayer", "method", method, MAGNITUDE_SCALES)
        self.method = method
        self.channels = int(channels)
        self.pcen_K = int(pcen_K)
        self.is_trainable = bool(is_trainable)
        if method == "pwl":  # attribute names are the weight paths in the checkpoint
            self._pwl_k0_dw, self._pwl_shift_dws, self._pwl_k_dws = _pwl_layers(
                name, self.is_trainable
            )

    def pwl_layers(self):
        """(k0, shifts, slopes) of the PWL curve, or None for `none`."""
        if self.method != "pwl":
            return None
        return self._pwl_k0_dw, self._pwl_shift_dws, self._pwl_k_dws

    def build(self, input_shape):
        for layer in _flat(self.pwl_layers()):
            layer.build(input_shape)
        self.built = True

    def call(self, inputs):
        branches = self.pwl_layers()
        return inputs if branches is None else _apply_pwl(inputs, *branches)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "method": self.method, "channels": self.channels,
                "pcen_K": self.pcen_K, "is_trainable": self.is_trainable}


def _flat(branches) -> list:
    if branches is None:
        return []
    k0, shifts, slopes = branches
    return [k0, *shifts, *slopes]


class AudioFrontendLayer(keras.layers.Layer):
    """BirdNET-STM32's audio frontend: (B, bins, T, 1) in, (B, mel_bins, spec_width, 1) out.

    `hybrid`: linear STFT magnitude -> 1x1 mel mixer (Slaney basis, input channels padded
    to a multiple of 8) -> ReLU -> [divide by the per-sample maximum] -> magnitude scaling.
    `precomputed`: the input cut to `spec_width` frames, nothing else. `layout` (legacy or
    current) and `peak_normalize` are n6qat's additions; None takes them from the file
    being loaded (`checkpoint_layout`), peak normalization for current hybrid layers.
    """

    def __init__(self, mode, mel_bins, spec_width, sample_rate, chunk_duration,
                 fft_length=512, pcen_K=8, init_mel=True, mel_fmin=150.0, mel_fmax=None,
                 mel_norm="slaney", mag_scale="pwl", is_trainable=False, layout=None,
                 peak_normalize=None, name="audio_frontend", **kwargs):
        super().__init__(name=name, **kwargs)
        require_supported("AudioFrontendLayer", "mode", mode, FRONTEND_MODES)
        require_supported("AudioFrontendLayer", "mag_scale", mag_scale, MAGNITUDE_SCALES)
        layout = layout or _LAYOUT.get() or "current"
        if layout not in LAYOUTS:
            raise N6QATError(f"AudioFrontendLayer layout must be one of {LAYOUTS}, got {layout!r}")
        self.mode, self.mag_scale, self.layout = mode, mag_scale, layout
        self.mel_bins, self.spec_width = int(mel_bins), int(spec_width)
        self.sample_rate, self.chunk_duration = int(sample_rate), chunk_duration
        self.fft_length, self.pcen_K, self.init_mel = int(fft_length), int(pcen_K), init_mel
        self.mel_fmin, self.mel_fmax, self.mel_norm = float(mel_fmin), mel_fmax, mel_norm
        self.is_trainable = bool(is_trainable)
        if peak_normalize is None:
            peak_normalize = mode == "hybrid" and layout == "current"
        self.peak_normalize = bool(peak_normalize)
        self._channel_pad = 0
        # Attribute names below are the weight paths inside the checkpoint.
        self.mel_mixer = keras.layers.Conv2D(
            self.mel_bins, (1, 1), padding="same", use_bias=False,
            kernel_constraint=keras.constraints.NonNeg(), name=f"{name}_mel_mixer",
            trainable=False,
        )
        if layout == "current":
            self.mag_layer = MagnitudeScalingLayer(
                method=mag_scale, channels=self.mel_bins, pcen_K=self.pcen_K,
                is_trainable=self.is_trainable, name=f"{name}_mag",
            )
        elif mag_scale == "pwl":
            self._pwl_k0_dw, self._pwl_shift_dws, self._pwl_k_dws = _pwl_layers(
                name, self.is_trainable
            )

    def pwl_layers(self):
        """(k0, shifts, slopes) of the PWL curve, or None without PWL scaling."""
        if self.layout == "current":
            return self.mag_layer.pwl_layers()
        if self.mag_scale != "pwl":
            return None
        return self._pwl_k0_dw, self._pwl_shift_dws, self._pwl_k_dws

    @property
    def fft_bins(self) -> int:
        return self.fft_length // 2 + 1

    def build(self, input_shape):
        if self.mode == "hybrid":
            if input_shape[1] is not None and int(input_shape[1]) != self.fft_bins:
                raise N6QATError(
                    f"AudioFrontendLayer {self.name!r} (hybrid, fft_length={self.fft_length}) "
                    f"expects {self.fft_bins} STFT bins, got input shape {tuple(input_shape)}"
                )
            self._channel_pad = (-self.fft_bins) % 8
            self.mel_mixer.build((None, 1, None, self.fft_bins + self._channel_pad))
            self.mel_mixer.kernel.assign(self._slaney_kernel())
        mel_shape = (None, 1, None, self.mel_bins)
        if self.layout == "current":
            self.mag_layer.build(mel_shape)
        else:
            for layer in _flat(self.pwl_layers()):
                layer.build(mel_shape)
        self.built = True

    def _slaney_kernel(self) -> np.ndarray:
        """The mel mixer's initial kernel (1, 1, bins + pad, mels); loading overwrites it."""
        import librosa

        fmax = int(self.mel_fmax) if self.mel_fmax is not None else self.sample_rate // 2
        basis = librosa.filters.mel(
            sr=self.sample_rate, n_fft=self.fft_length, n_mels=self.mel_bins,
            fmin=self.mel_fmin, fmax=float(fmax), htk=False, norm="slaney",
        ).T.astype(np.float32)
        return np.pad(basis, ((0, self._channel_pad), (0, 0)))[None, None]

    def call(self, inputs):
        if self.mode == "precomputed":
            return inputs[:, :, : self.spec_width, :]
        y = ops.transpose(inputs, (0, 3, 2, 1))[:, :, : self.spec_width, :]  # (B, 1, T, bins)
        if self._channel_pad:
            y = ops.pad(y, ((0, 0), (0, 0), (0, 0), (0, self._channel_pad)))
        y = ops.relu(self.mel_mixer(y))
        if self.peak_normalize:
            y = peak_normalized(y)
        if self.layout == "current":
            y = self.mag_layer(y)
        elif self.pwl_layers() is not None:
            y = _apply_pwl(y, *self.pwl_layers())
        return ops.transpose(y, (0, 3, 2, 1))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.mel_bins, self.spec_width, 1)

    def get_config(self):
        return {
            **super().get_config(),
            "mode": self.mode, "mel_bins": self.mel_bins, "spec_width": self.spec_width,
            "sample_rate": self.sample_rate, "chunk_duration": self.chunk_duration,
            "fft_length": self.fft_length, "pcen_K": self.pcen_K, "init_mel": self.init_mel,
            "mel_fmin": self.mel_fmin, "mel_fmax": self.mel_fmax, "mel_norm": self.mel_norm,
            "mag_scale": self.mag_scale, "is_trainable": self.is_trainable,
            "layout": self.layout, "peak_normalize": self.peak_normalize,
        }


def peak_normalized(x):
    """Each sample divided by its maximum (+1e-6), as BirdNET-STM32's current hybrid does."""
    peak = ops.max(x, axis=tuple(range(1, len(x.shape))), keepdims=True)
    return x / (peak + PEAK_EPSILON)


@keras.saving.register_keras_serializable(package="n6qat")
class PeakNormalization(keras.layers.Layer):
    """`peak_normalized` as a layer of its own, for unfolded current-layout frontends."""

    def call(self, inputs):
        return peak_normalized(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape


# BirdNET-STM32 saved these without a package: register them under their bare names.
keras.saving.get_custom_objects().update(
    {"AudioFrontendLayer": AudioFrontendLayer, "MagnitudeScalingLayer": MagnitudeScalingLayer}
)


def unfold_frontend(model: keras.Model, trainable: bool = True) -> keras.Model:
    """The same function with every BirdNET-STM32 layer rewritten as plain Keras layers.

    The frontend becomes Permute, Conv2D (mel mixer), ReLU, [PeakNormalization],
    DepthwiseConv2D / ReLU / Add (PWL), Permute, with the checkpoint's weights; the
    other layers are shared with `model`. `trainable` sets the new layers' flag (QAT
    trains and quantizes them like any other layer unless they are frozen).
    """
    custom = (AudioFrontendLayer, MagnitudeScalingLayer)
    if not any(isinstance(layer, custom) for layer in model.layers):
        return model

    def call(layer, *args, **kwargs):
        if isinstance(layer, AudioFrontendLayer):
            return _plain_frontend(layer, args[0], trainable)
        if isinstance(layer, MagnitudeScalingLayer):
            return _plain_pwl(args[0], layer.pwl_layers(), trainable)
        return layer(*args, **kwargs)

    return keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)


def _plain_frontend(frontend: AudioFrontendLayer, x, trainable: bool):
    from keras import layers

    name = frontend.name
    extra = (x.shape[2] or frontend.spec_width) - frontend.spec_width
    if extra > 0:
        x = layers.Cropping2D(((0, 0), (0, extra)), name=f"{name}_crop")(x)
    if frontend.mode == "precomputed":
        return x
    x = layers.Permute((3, 2, 1), name=f"{name}_bins_last")(x)  # (1, T, bins)
    mixer = layers.Conv2D(
        frontend.mel_bins, (1, 1), use_bias=False, name=f"{name}_mel_mixer",
        kernel_constraint=keras.constraints.NonNeg(), trainable=trainable,
    )
    x = mixer(x)
    # The zero-padded input channels only ever meet zeros: drop their kernel rows.
    mixer.set_weights([frontend.mel_mixer.get_weights()[0][:, :, : frontend.fft_bins]])
    x = layers.ReLU(name=f"{name}_relu")(x)
    if frontend.peak_normalize:
        x = PeakNormalization(name=f"{name}_peak_norm")(x)
    x = _plain_pwl(x, frontend.pwl_layers(), trainable)
    return layers.Permute((3, 2, 1), name=f"{name}_mels_first")(x)


def _plain_pwl(x, branches, trainable: bool):
    """PWL branches as fresh DepthwiseConv2D / ReLU / Add layers holding the same weights."""
    from keras import layers

    if branches is None:
        return x

    def copy(layer, inputs):
        new = layers.DepthwiseConv2D.from_config({**layer.get_config(), "trainable": trainable})
        outputs = new(inputs)
        new.set_weights(layer.get_weights())
        return outputs

    k0, shifts, slopes = branches
    terms = [copy(k0, x)]
    for shift, slope in zip(shifts, slopes, strict=True):
        relu = layers.ReLU(name=f"{shift.name}_relu")(copy(shift, x))
        terms.append(copy(slope, relu))
    return layers.Add(name=f"{k0.name[: -len('_k0_dw')]}_add")(terms)


def check_sidecar(model: keras.Model, features: dict, source: str) -> None:
    """Stop when the model's frontend was built for other audio settings than `features`."""
    pairs = {"sample_rate": "sample_rate", "fft_length": "n_fft", "spec_width": "spec_width",
             "mel_bins": "n_mels", "chunk_duration": "chunk_duration"}
    for layer in model.layers:
        if not isinstance(layer, AudioFrontendLayer):
            continue
        config = layer.get_config()
        wrong = {
            key: (config[key], features[field]) for key, field in pairs.items()
            if field in features and float(config[key]) != float(features[field])
            and (key != "fft_length" or layer.mode == "hybrid")
        }
        if wrong:
            details = ", ".join(f"{k}: layer {a} vs features {b}" for k, (a, b) in wrong.items())
            raise N6QATError(
                f"{source}: the frontend layer {layer.name!r} does not fit the features "
                f"({details}); use the checkpoint's own _model_config.json."
            )
