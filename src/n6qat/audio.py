"""Reading audio files: header metadata without decoding, and mono float32 at a chosen rate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from n6qat.errors import N6QATError

AUDIO_EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".ogg", ".mp3")

# soxr "HQ": 20-bit precision, steep low-pass; the same resampler librosa uses for "soxr_hq".
RESAMPLE_QUALITY = "HQ"


class AudioReadError(N6QATError):
    """An audio file that soundfile cannot open; `reason` is libsndfile's short message."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"cannot read audio file {path}: {reason} "
            "Check that it is valid WAV, FLAC, OGG or MP3 audio, or remove it from the data folder."
        )
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class AudioInfo:
    """What an audio file's header says about it."""

    sample_rate: int
    channels: int
    frames: int
    duration: float
    format: str
    subtype: str


def has_audio_extension(path: Path) -> bool:
    """Whether the file name ends in one of AUDIO_EXTENSIONS, ignoring case."""
    return path.suffix.lower() in AUDIO_EXTENSIONS


def _short_reason(error: Exception) -> str:
    """libsndfile's message without the file path that soundfile prefixes to it."""
    return getattr(error, "error_string", None) or str(error)


def read_audio_info(path: Path) -> AudioInfo:
    """Read an audio file's header only (no decoding), raising AudioReadError if unreadable."""
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError, OSError) as error:
        raise AudioReadError(path, _short_reason(error)) from error
    return AudioInfo(
        sample_rate=int(info.samplerate),
        channels=int(info.channels),
        frames=int(info.frames),
        duration=info.frames / info.samplerate if info.samplerate else 0.0,
        format=str(info.format),
        subtype=str(info.subtype),
    )


def _read_window(audio: sf.SoundFile, start: int, count: int) -> np.ndarray:
    """Read count frames (-1: to the end) from frame start as float32 (frames, channels).

    MP3 is read in one call from the beginning: soundfile re-seeks after every read, and
    libsndfile's MP3 seek drops the decoder's bit reservoir, garbling the next few thousand
    samples. Other formats seek exactly.
    """
    if audio.format == "MP3":
        total = -1 if count < 0 else start + count
        return audio.read(total, dtype="float32", always_2d=True)[start:]
    audio.seek(start)
    return audio.read(count, dtype="float32", always_2d=True)


def _read_frames(path: Path, offset: float, max_duration: float | None) -> tuple[np.ndarray, int]:
    """The frames in [offset, offset + max_duration) as float32 (frames, channels)."""
    try:
        with sf.SoundFile(str(path)) as audio:
            native_rate = audio.samplerate
            start = min(round(offset * native_rate), audio.frames)
            count = -1 if max_duration is None else round(max_duration * native_rate)
            return _read_window(audio, start, count), native_rate
    except (sf.SoundFileError, RuntimeError, OSError) as error:
        raise AudioReadError(path, _short_reason(error)) from error


def load_audio(
    path: Path, sample_rate: int, offset: float = 0.0, max_duration: float | None = None
) -> np.ndarray:
    """Load a clip as float32 mono (channel mean) resampled to sample_rate.

    Only the frames from `offset` seconds for at most `max_duration` seconds are decoded
    (MP3: from the start, see _read_window); an offset past the end gives an empty array.
    """
    if offset < 0 or (max_duration is not None and max_duration < 0):
        raise N6QATError(
            f"{path}: offset ({offset}) and max_duration ({max_duration}) must not be negative."
        )
    frames, native_rate = _read_frames(path, offset, max_duration)
    mono = np.ascontiguousarray(frames.mean(axis=1, dtype=np.float32))
    if native_rate == sample_rate or mono.size == 0:
        return mono
    return soxr.resample(mono, native_rate, sample_rate, quality=RESAMPLE_QUALITY)
