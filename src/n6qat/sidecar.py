"""The feature settings a BirdNET-STM32 checkpoint's sidecar JSON asks for.

Kept free of Keras and TensorFlow so that the Snakefile can read a sidecar at parse time.
"""

from __future__ import annotations

import json
from pathlib import Path

from n6qat.errors import N6QATError

MAGNITUDE_SCALES = ("pwl", "none")
BIRDNET_FMIN = 150.0
"""BirdNET-STM32's offline mel features always start at 150 Hz and end at sr // 2."""

SIDECAR_KEYS = {
    "sample_rate": "sample_rate",
    "fft_length": "n_fft",
    "spec_width": "spec_width",
    "chunk_duration": "chunk_duration",
    "num_mels": "n_mels",
}
"""Sidecar keys taken as they are, and the FeatureSettings field each one sets."""

SIDECAR_FRONTENDS = {"hybrid": "linear", "librosa": "mel", "precomputed": "mel"}
"""Sidecar `audio_frontend` values n6qat reads, and the feature kind each one needs."""

_UNSUPPORTED = {
    "raw": "a raw-waveform frontend, a strided Conv2D filterbank",
    "tf": "a raw-waveform frontend, a strided Conv2D filterbank",
    "mfcc": "MFCC features",
    "log_mel": "log1p mel features",
    "pcen": "PCEN-like magnitude scaling",
    "db": "decibel magnitude scaling",
}


def require_supported(kind: str, key: str, value: str, supported: tuple[str, ...]) -> None:
    if value not in supported:
        what = _UNSUPPORTED.get(value, "an unknown setting")
        raise N6QATError(
            f"BirdNET-STM32 {kind} with {key}={value!r} ({what}) is not supported by n6qat; "
            f"supported: {', '.join(supported)}. Retrain the checkpoint with one of those."
        )


def sidecar_path(checkpoint: Path) -> Path:
    """`<stem>_model_config.json` beside the checkpoint."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + "_model_config.json")


def read_sidecar(path: Path) -> dict:
    """FeatureSettings fields for the input a BirdNET-STM32 checkpoint expects.

    Takes sample_rate, fft_length (n_fft), spec_width, chunk_duration, num_mels (n_mels),
    audio_frontend (hybrid: linear features; librosa/precomputed: mel), mag_scale (for
    librosa the features' own PWL or none) and checks hop_length. BirdNET-STM32 always
    uses a centred Hann STFT, hop = chunk samples // spec_width, mel bands 150 Hz to
    sr // 2, and min-max scales each spectrogram to [0, 1]; those are set too.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise N6QATError(f"cannot read the BirdNET-STM32 model config {path}: {exc}") from exc
    missing = sorted({*SIDECAR_KEYS, "audio_frontend"} - set(data))
    if missing:
        raise N6QATError(f"{path}: the model config lacks the keys {missing}")
    frontend = data["audio_frontend"]
    mag_scale = data.get("mag_scale", "none")
    try:
        require_supported("model config", "audio_frontend", frontend, tuple(SIDECAR_FRONTENDS))
        require_supported("model config", "mag_scale", mag_scale, MAGNITUDE_SCALES)
    except N6QATError as exc:
        raise N6QATError(f"{path}: {exc}") from None
    settings = {field: data[key] for key, field in SIDECAR_KEYS.items()}
    settings = {
        **settings,
        "sample_rate": int(settings["sample_rate"]),
        "n_fft": int(settings["n_fft"]),
        "spec_width": int(settings["spec_width"]),
        "n_mels": int(settings["n_mels"]),
        "chunk_duration": float(settings["chunk_duration"]),
    }
    hop = int(round(settings["sample_rate"] * settings["chunk_duration"])) // settings["spec_width"]
    if int(data.get("hop_length", hop)) != hop:
        raise N6QATError(
            f"{path}: hop_length={data['hop_length']} disagrees with sample_rate x "
            f"chunk_duration // spec_width = {hop}, the hop BirdNET-STM32's feature code "
            "uses; correct the model config."
        )
    kind = SIDECAR_FRONTENDS[frontend]
    return {
        **settings,
        "kind": kind,
        "hop_length": hop,
        "fmin": BIRDNET_FMIN,
        "fmax": float(settings["sample_rate"] // 2),
        "magnitude_scale": mag_scale if kind == "mel" else "none",
        "center": True,
        "normalization": "minmax",
    }
