"""Fixed-length chunks of audio turned into the model's input spectrograms, cached on disk.

The default input is the linear STFT magnitude of a peak-normalised chunk (the "hybrid"
idea of BirdNET-STM32): the Cortex-M55 firmware computes it cheaply with CMSIS-DSP, and
the mel mixing happens inside the model as a 1x1 convolution on the NPU. A precomputed
mel spectrogram is available as ``kind="mel"``.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from n6qat.atomic import atomic_path
from n6qat.config import with_schema_defaults
from n6qat.errors import N6QATError

log = logging.getLogger(__name__)

FEATURE_KINDS = ("linear", "mel")
MAGNITUDE_SCALES = ("none", "sqrt", "log", "db", "pcen", "pwl")

LOG_OFFSET = 1e-3
"""``log``: log(1 + x / LOG_OFFSET) / log(1 + 1 / LOG_OFFSET), so [0, 1] maps onto [0, 1]."""

# ``pcen``: per-channel energy normalization (Wang et al., 2017) with a first-order IIR
# smoother along frames; defaults chosen for peak-normalised magnitudes in [0, 1].
PCEN_SMOOTHING = 0.025
PCEN_ALPHA = 0.98
PCEN_DELTA = 2.0
PCEN_POWER = 0.5
PCEN_EPS = 1e-6
NORMALIZATIONS = ("peak", "minmax")

# BirdNET-STM32's offline magnitude curve on min-max scaled magnitudes: knots and slopes.
PWL_MINMAX_KNOTS = (0.10, 0.35, 0.65)
PWL_MINMAX_SLOPES = (0.40, 0.25, 0.15, 0.08)


@dataclass(frozen=True)
@with_schema_defaults("features")
class FeatureSettings:
    """How a chunk of audio becomes a model input of shape (bins, spec_width, 1).

    ``normalization="peak"`` scales each chunk to peak 1 and the spectrum by the window;
    ``"minmax"`` (BirdNET-STM32's) leaves both raw and scales each finished spectrogram
    to [0, 1]. ``center`` centres frame i on sample i * hop (zero padding), as librosa.
    Every default is the schema's (config section ``features``).
    """

    kind: str
    sample_rate: int
    chunk_duration: float
    n_fft: int
    spec_width: int
    n_mels: int
    fmin: float
    fmax: float | None
    magnitude_scale: str
    max_duration: float
    max_chunks_per_file: int
    min_chunk_energy: float
    hop_length: int | None
    center: bool
    normalization: str

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS:
            raise N6QATError(f"features.kind must be one of {FEATURE_KINDS}, got {self.kind!r}")
        if self.normalization not in NORMALIZATIONS:
            raise N6QATError(
                f"features.normalization must be one of {NORMALIZATIONS}, "
                f"got {self.normalization!r}"
            )
        if self.magnitude_scale not in MAGNITUDE_SCALES:
            raise N6QATError(
                f"features.magnitude_scale must be one of {MAGNITUDE_SCALES}, "
                f"got {self.magnitude_scale!r}"
            )
        if self.hop < 1 or self.frames_needed > self.chunk_samples + self.n_fft:
            raise N6QATError(
                "features: spec_width is too large for chunk_duration x sample_rate "
                f"({self.spec_width} frames of {self.chunk_samples} samples)"
            )

    @property
    def chunk_samples(self) -> int:
        return int(round(self.chunk_duration * self.sample_rate))

    @property
    def hop(self) -> int:
        """Hop between STFT frames: the chunk spread over ``spec_width`` frames."""
        return self.hop_length or self.chunk_samples // self.spec_width

    @property
    def frames_needed(self) -> int:
        """Samples the STFT reads for ``spec_width`` frames without centring."""
        return (self.spec_width - 1) * self.hop + self.n_fft

    @property
    def bins(self) -> int:
        return self.n_fft // 2 + 1 if self.kind == "linear" else self.n_mels

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.bins, self.spec_width, 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> FeatureSettings:
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def chunk_signal(signal: np.ndarray, settings: FeatureSettings) -> tuple[np.ndarray, np.ndarray]:
    """Cut a mono signal into non-overlapping chunks, zero-padding the last (or only) one.

    A trailing remainder shorter than half a chunk is dropped unless it is the whole file.
    Returns the chunks (n, chunk_samples) and their start times in seconds.
    """
    size = settings.chunk_samples
    n_full, rest = divmod(len(signal), size)
    n = n_full + (1 if rest >= size // 2 or n_full == 0 else 0)
    padded = np.zeros(n * size, dtype=np.float32)
    usable = min(len(signal), n * size)
    padded[:usable] = signal[:usable]
    starts = np.arange(n, dtype=np.float64) * settings.chunk_duration
    return padded.reshape(n, size), starts


def chunk_energy(chunks: np.ndarray) -> np.ndarray:
    """Root-mean-square level of each chunk."""
    return np.sqrt(np.mean(np.square(chunks, dtype=np.float64), axis=1)).astype(np.float32)


def select_chunks(energy: np.ndarray, negative: bool, settings: FeatureSettings) -> np.ndarray:
    """Indices of the chunks to keep: loud enough to hold a call (all, for negatives).

    A labelled file's quiet stretches would otherwise be taught as calls: keep chunks whose
    RMS is at least ``min_chunk_energy`` of the file's loudest, always the loudest one,
    at most ``max_chunks_per_file`` (the loudest, in time order).
    """
    order = np.argsort(-energy, kind="stable")
    if not negative and energy.size:
        keep = energy[order] >= settings.min_chunk_energy * energy[order[0]]
        keep[0] = True
        order = order[keep]
    return np.sort(order[: settings.max_chunks_per_file])


def stft_magnitude(chunks: np.ndarray, settings: FeatureSettings) -> np.ndarray:
    """Linear STFT magnitude (n, n_fft/2+1, spec_width) of the chunks.

    With peak normalization the chunks are peak-normalised and the spectrum divided by
    half the window sum; with min-max, the plain |STFT| (scaled later in `spectrogram`).
    """
    peak_normalized = settings.normalization == "peak"
    if peak_normalized:
        peak = np.max(np.abs(chunks), axis=1, keepdims=True)
        chunks = chunks / np.where(peak > 1e-8, peak, 1.0)
    if settings.center:
        half = settings.n_fft // 2
        chunks = np.pad(chunks, ((0, 0), (half, half)))
    need = settings.frames_needed
    if chunks.shape[1] < need:
        chunks = np.pad(chunks, ((0, 0), (0, need - chunks.shape[1])))
    starts = settings.hop * np.arange(settings.spec_width)
    idx = starts[:, None] + np.arange(settings.n_fft)[None, :]
    window = np.hanning(settings.n_fft + 1)[:-1].astype(np.float32)
    frames = chunks[:, idx] * window  # (n, spec_width, n_fft)
    spectrum = np.abs(np.fft.rfft(frames, axis=-1)).astype(np.float32)
    if peak_normalized:
        spectrum /= np.sum(window) / 2.0
    return np.transpose(spectrum, (0, 2, 1))


def mel_basis(settings: FeatureSettings) -> np.ndarray:
    """Slaney mel filter bank (n_mels, n_fft/2+1) for the settings' rate and band."""
    import librosa

    return librosa.filters.mel(
        sr=settings.sample_rate,
        n_fft=settings.n_fft,
        n_mels=settings.n_mels,
        fmin=settings.fmin,
        fmax=settings.fmax,
        htk=False,
        norm="slaney",
    ).astype(np.float32)


def scale_magnitude(spec: np.ndarray, scale: str) -> np.ndarray:
    """Compress magnitudes (n, bins, frames): none, square root, log with an offset
    (``LOG_OFFSET``), decibels mapped to [0, 1] over 80 dB, pcen (``pcen``), or pwl:
    BirdNET-STM32's piecewise-linear curve on min-max scaled values.

    Firmware cost per value on a Cortex-M55 with FPU (estimates, not measured on the
    board): sqrt one VSQRT; log and db one logf (a polynomial approximation); pcen two
    multiply-adds for the smoother plus a powf and a sqrtf (``PCEN_POWER`` 0.5); pwl a
    few compare/multiply-adds.
    """
    if scale == "sqrt":
        return np.sqrt(spec)
    if scale == "log":
        return (np.log1p(spec / LOG_OFFSET) / np.log1p(1.0 / LOG_OFFSET)).astype(np.float32)
    if scale == "pcen":
        return pcen(spec)
    if scale == "db":
        db = 20.0 * np.log10(np.maximum(spec, 1e-4))
        return np.clip((db + 80.0) / 80.0, 0.0, 1.0).astype(np.float32)
    if scale == "pwl":
        x = minmax_scale(spec)
        out = PWL_MINMAX_SLOPES[0] * x
        for knot, slope in zip(PWL_MINMAX_KNOTS, PWL_MINMAX_SLOPES[1:], strict=True):
            out = out + slope * np.maximum(x - knot, 0.0)
        return out.astype(np.float32)
    return spec


def pcen(spec: np.ndarray) -> np.ndarray:
    """Per-channel energy normalization of (n, bins, frames) magnitudes along the frames.

    M_t = (1 - s) M_{t-1} + s E_t with M_0 = E_0 (a streaming smoother the firmware keeps
    per bin), then (E / (eps + M)^alpha + delta)^r - delta^r: an automatic gain per
    frequency bin that flattens stationary background and keeps onsets.
    """
    spec = np.asarray(spec, dtype=np.float32)
    smooth = np.empty_like(spec)
    smooth[..., 0] = spec[..., 0]
    for t in range(1, spec.shape[-1]):
        smooth[..., t] = (1.0 - PCEN_SMOOTHING) * smooth[..., t - 1] + PCEN_SMOOTHING * spec[..., t]
    gain = spec / (PCEN_EPS + smooth) ** PCEN_ALPHA
    return ((gain + PCEN_DELTA) ** PCEN_POWER - PCEN_DELTA**PCEN_POWER).astype(np.float32)


def minmax_scale(spec: np.ndarray) -> np.ndarray:
    """Each spectrogram (first axis) shifted and scaled to [0, 1], as BirdNET-STM32 does."""
    axes = tuple(range(1, spec.ndim))
    low = np.min(spec, axis=axes, keepdims=True)
    high = np.max(spec, axis=axes, keepdims=True)
    return ((spec - low) / (high - low + 1e-10)).astype(np.float32)


def spectrogram(chunks: np.ndarray, settings: FeatureSettings) -> np.ndarray:
    """Model inputs (n, bins, spec_width, 1) for a batch of raw chunks."""
    spec = stft_magnitude(chunks, settings)
    if settings.kind == "mel":
        spec = np.einsum("mf,nft->nmt", mel_basis(settings), spec)
    spec = scale_magnitude(spec, settings.magnitude_scale)
    if settings.normalization == "minmax":
        spec = minmax_scale(spec)
    return spec[..., None].astype(np.float32)


def file_features(
    path: Path, negative: bool, settings: FeatureSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load one file once and return (features, chunk start times, chunk energies)."""
    from n6qat.audio import load_audio

    signal = load_audio(path, settings.sample_rate, max_duration=settings.max_duration)
    chunks, starts = chunk_signal(signal, settings)
    energy = chunk_energy(chunks)
    keep = select_chunks(energy, negative, settings)
    return spectrogram(chunks[keep], settings), starts[keep], energy[keep]


def _file_job(args: tuple[str, bool, dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    path, negative, settings = args
    return file_features(Path(path), negative, FeatureSettings.from_dict(settings))


def extract_features(
    files: pd.DataFrame,
    roots: dict[str, Path],
    labels: Sequence[str],
    settings: FeatureSettings,
    out_npy: Path,
    out_chunks: Path,
    workers: int = 1,
) -> pd.DataFrame:
    """Compute every file's chunks into one float16 ``.npy`` (memory-mappable) plus a table.

    ``files`` is the index (columns ``path``, ``source``, ``label``, ``negative``);
    ``roots`` maps each ``source`` to its tree. The chunk table has one row per chunk:
    path, source, label, label_index (-1 for negatives), start (s), energy, row.
    Both outputs are written to temporary names first, then moved into place.
    """
    label_index = {name: i for i, name in enumerate(labels)}
    shared = settings.to_dict()
    jobs = (
        (str(roots[row.source] / row.path), bool(row.negative), shared)
        for row in files.itertuples()
    )
    started = time.perf_counter()
    rows = []
    with atomic_path(out_npy) as tmp, _NpyRows(tmp, settings.input_shape) as out:
        for row, (feats, starts, energy) in zip(
            files.itertuples(), _run_jobs(jobs, workers if len(files) > 1 else 1), strict=True
        ):
            target = -1 if row.negative else label_index[row.label]
            for start, level in zip(starts, energy, strict=True):
                rows.append((row.path, row.source, row.label, target, float(start), float(level)))
            out.append(feats)
    table = pd.DataFrame(
        rows, columns=["path", "source", "label", "label_index", "start", "energy"]
    )
    table["row"] = np.arange(len(table))
    with atomic_path(out_chunks) as tmp:
        table.to_csv(tmp, index=False)
    elapsed = time.perf_counter() - started
    audio_s = float(files["duration"].clip(upper=settings.max_duration).sum())
    log.info(
        "features: %d files, %d chunks, %.1f s of audio in %.1f s (%.0fx real time, %d workers)",
        len(files), len(table), audio_s, elapsed, audio_s / max(elapsed, 1e-9), workers,
    )
    return table


JOBS_AHEAD = 8
"""Files each worker may have computed ahead of the writer (bounds memory)."""


def _run_jobs(jobs: Iterable, workers: int) -> Iterator:
    """Every job's result, in order, computed at most ``JOBS_AHEAD`` per worker ahead."""
    if workers <= 1:
        yield from map(_file_job, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        todo = iter(jobs)
        for job in itertools.islice(todo, workers * JOBS_AHEAD):
            pending.append(pool.submit(_file_job, job))
        while pending:
            result = pending.popleft().result()
            for job in itertools.islice(todo, 1):
                pending.append(pool.submit(_file_job, job))
            yield result


class _NpyRows:
    """A float16 ``.npy`` written one block of rows at a time: nothing is held in memory.

    The row count is known only at the end, so the data goes after room for a header
    with a 12-digit count; the real header is then written in front. When that header is
    shorter (``.npy`` headers are padded to 64 bytes), the data is moved up once. The
    file is byte-for-byte what ``np.save`` writes for the same array.
    """

    RESERVED_ROWS = 10**12

    def __init__(self, path: Path, row_shape: tuple[int, ...]):
        self.path, self.row_shape, self.rows = Path(path), tuple(row_shape), 0
        self.offset = len(self._header(self.RESERVED_ROWS))

    def _header(self, rows: int) -> bytes:
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(buffer, {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
            "fortran_order": False, "shape": (rows, *self.row_shape),
        })  # fmt: skip
        return buffer.getvalue()

    def __enter__(self) -> _NpyRows:
        self.file = open(self.path, "w+b")  # noqa: SIM115 (closed in __exit__)
        self.file.seek(self.offset)
        return self

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=np.float16)
        if block.shape[1:] != self.row_shape:
            raise N6QATError(f"feature block {block.shape[1:]} is not {self.row_shape}")
        self.file.write(block.tobytes())
        self.rows += len(block)

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                self._finish()
        finally:
            self.file.close()

    def _finish(self) -> None:
        header = self._header(self.rows)
        size = self.rows * int(np.prod(self.row_shape, dtype=np.int64)) * 2
        if len(header) != self.offset:  # move the data up behind the shorter header
            read, write = self.offset, len(header)
            while read < self.offset + size:
                self.file.seek(read)
                block = self.file.read(min(1 << 24, self.offset + size - read))
                self.file.seek(write)
                self.file.write(block)
                read, write = read + len(block), write + len(block)
            self.file.truncate(len(header) + size)
        self.file.seek(0)
        self.file.write(header)
        self.file.flush()
        os.fsync(self.file.fileno())


def load_features(npy: Path) -> np.ndarray:
    """The cached features, memory-mapped read-only (float16)."""
    return np.load(npy, mmap_mode="r")
