"""Deterministic synthetic bird-call dataset: the workflow's default demo data.

Eight made-up species with distinct but partly overlapping call structure, mixed over
coloured noise, low rumble and faint calls of other species, written as the mix of
formats a real recording tree has (WAV at 22.05/44.1/48 kHz, FLAC, some stereo).
Every file is drawn from its own random stream (seed, split, label, index), so a file
does not depend on generation order or on ``scale``: a smaller tree is a prefix of a
larger one.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from scipy.fft import next_fast_len

from n6qat.atomic import atomic_path
from n6qat.errors import N6QATError

Generator = np.random.Generator
CallMaker = Callable[[Generator, np.ndarray, int, tuple[float, float]], np.ndarray]

SPLITS = ("train", "test")
NOISE_LABEL = "noise"
SAMPLE_RATES = (22050, 44100, 48000)
FLAC_FRACTION = 0.2
STEREO_FRACTION = 0.25
SHORT_FRACTION, LONG_FRACTION = 0.1, 0.1
SHORT_S, MEDIUM_S, LONG_S = (1.2, 3.0), (3.0, 12.0), (12.0, 30.0)
BAND_HZ = (1000.0, 7000.0)
SHARED_BAND_HZ = (2000.0, 4500.0)
RUMBLE_CUTOFF_HZ = 150.0
PEAK_DBFS = (-12.0, -1.0)


@dataclass(frozen=True)
class Difficulty:
    """Knobs that make the demo task harder or easier; tune DEFAULT_DIFFICULTY."""

    snr_db: tuple[float, float] = (-5.0, 20.0)  # calls vs 1-7 kHz noise, uniform per file
    overlap: float = 0.2  # 0: species' own pitch ranges, 1: all share SHARED_BAND_HZ
    calls_per_s: tuple[float, float] = (0.4, 1.2)  # call rate, sets n_calls per file
    distractor_prob: float = 0.5  # chance a file has faint calls of other species
    distractor_db: tuple[float, float] = (-22.0, -8.0)  # their level vs the file's calls
    rumble_db: tuple[float, float] = (-5.0, 15.0)  # rumble power vs in-band noise power
    noise_alpha: tuple[float, float] = (1.0, 2.0)  # noise 1/f^alpha: 1 pink, 2 brown


DEFAULT_DIFFICULTY = Difficulty()


@dataclass(frozen=True)
class DemoFile:
    """What one demo file will be: where it goes, its format and what it holds."""

    seed: int
    split: str
    label: str
    index: int
    sample_rate: int
    channels: int
    format: str
    duration_s: float
    snr_db: float
    n_calls: int

    @property
    def path(self) -> str:
        """Path relative to the dataset folder, with forward slashes."""
        ext = "flac" if self.format == "FLAC" else "wav"
        return f"{self.split}/{self.label}/{self.label}_{self.split}{self.index:03d}.{ext}"

    @property
    def n_samples(self) -> int:
        """Frames in the file."""
        return round(self.duration_s * self.sample_rate)


def _uniform(rng: Generator, bounds: tuple[float, float]) -> float:
    """One draw from a (low, high) range."""
    return float(rng.uniform(bounds[0], bounds[1]))


def _phase(freq_hz: np.ndarray, sr: int) -> np.ndarray:
    """Integrate an instantaneous-frequency track into phase (radians)."""
    return 2.0 * np.pi * np.cumsum(freq_hz) / sr


def _gate(t: np.ndarray, start: float, stop: float, ramp: float) -> np.ndarray:
    """1 between start and stop with linear ramps, so notes do not click."""
    return np.clip((t - start) / ramp, 0.0, 1.0) * np.clip((stop - t) / ramp, 0.0, 1.0)


def _whistle(rng: Generator, t: np.ndarray, sr: int, band: tuple[float, float]) -> np.ndarray:
    """Pure tone with slow drift and vibrato."""
    drift, depth = rng.uniform(-0.08, 0.08), rng.uniform(0.005, 0.03)
    vibrato = np.sin(2 * np.pi * rng.uniform(4.0, 9.0) * t)
    freq = _uniform(rng, band) * (1 + drift * t / t[-1] + depth * vibrato)
    return np.sin(_phase(freq, sr))


def _two_note(rng: Generator, t: np.ndarray, sr: int, band: tuple[float, float]) -> np.ndarray:
    """Two steady notes, the second lower, separated by a short gap."""
    high = _uniform(rng, band)
    low = high * rng.uniform(0.72, 0.9)
    split, gap = t[-1] * rng.uniform(0.4, 0.55), t[-1] * rng.uniform(0.04, 0.12)
    freq = np.where(t < split, high, low)
    ramp = 0.01
    amp = _gate(t, 0.0, split - gap / 2, ramp) + _gate(t, split + gap / 2, t[-1], ramp)
    return amp * np.sin(_phase(freq, sr))


def _sweep(t: np.ndarray, sr: int, start_hz: float, end_hz: float) -> np.ndarray:
    """Exponential frequency sweep from start_hz to end_hz over t."""
    freq = start_hz * (end_hz / start_hz) ** (t / t[-1])
    return np.sin(_phase(freq, sr))


def _upsweep(rng: Generator, t: np.ndarray, sr: int, band: tuple[float, float]) -> np.ndarray:
    """Rising FM sweep."""
    start = _uniform(rng, band)
    return _sweep(t, sr, start, min(start * rng.uniform(1.4, 2.0), 6800.0))


def _downsweep(rng: Generator, t: np.ndarray, sr: int, band: tuple[float, float]) -> np.ndarray:
    """Falling FM sweep."""
    start = _uniform(rng, band)
    return _sweep(t, sr, start, max(start / rng.uniform(1.4, 2.0), 1100.0))


def _chirp_series(rng: Generator, t: np.ndarray, sr: int, band: tuple[float, float]) -> np.ndarray:
    """Fast series of short rising chirps (shares its range with the up-sweep)."""
    start, ratio = _uniform(rng, band), rng.uniform(1.3, 1.8)
    rate, duty = rng.uniform(8.0, 16.0), rng.uniform(0.35, 0.6)
    within = (t * rate) % 1.0 / duty
    on = within < 1.0
    freq = start * ratio ** np.minimum(within, 1.0)
    return on * np.sin(np.pi * np.minimum(within, 1.0)) * np.sin(_phase(freq, sr))


def _trill(rng: Generator, t: np.ndarray, sr: int, band: tuple[float, float]) -> np.ndarray:
    """Tone amplitude-modulated into rapid pulses."""
    freq = _uniform(rng, band) * (1 + rng.uniform(-0.05, 0.05) * t / t[-1])
    pulses = np.abs(np.sin(np.pi * rng.uniform(12.0, 30.0) * t)) ** rng.uniform(1.0, 3.0)
    return pulses * np.sin(_phase(freq, sr))


def _buzz(rng: Generator, t: np.ndarray, sr: int, band: tuple[float, float]) -> np.ndarray:
    """Band of noise pulsed at a buzzy rate."""
    centre, width = _uniform(rng, band), rng.uniform(600.0, 2000.0)
    freqs = np.fft.rfftfreq(t.size, 1 / sr)
    spectrum = rng.standard_normal(freqs.size) + 1j * rng.standard_normal(freqs.size)
    noise = np.fft.irfft(spectrum * (np.abs(freqs - centre) < width / 2), t.size)
    depth = rng.uniform(0.3, 0.9)
    return noise * (1 - depth * np.sin(np.pi * rng.uniform(40.0, 90.0) * t) ** 2)


def _harmonic_stack(
    rng: Generator, t: np.ndarray, sr: int, band: tuple[float, float]
) -> np.ndarray:
    """Nasal call: a low fundamental with decaying harmonics, all below 7 kHz."""
    f0 = _uniform(rng, band) * (1 + rng.uniform(-0.1, 0.05) * t / t[-1])
    orders = np.arange(1, int(BAND_HZ[1] // f0.max()) + 1)
    amps = rng.uniform(0.3, 0.8) ** (orders - 1) * rng.uniform(0.7, 1.0, orders.size)
    return np.sin(np.outer(_phase(f0, sr), orders)) @ amps


@dataclass(frozen=True)
class CallType:
    """One species: how a call is made, its key frequency range and call length."""

    make: CallMaker
    band_hz: tuple[float, float]
    length_s: tuple[float, float]


SPECIES = {
    "whistler": CallType(_whistle, (2000.0, 3500.0), (0.35, 0.9)),
    "upsweep": CallType(_upsweep, (1500.0, 3200.0), (0.15, 0.45)),
    "downsweep": CallType(_downsweep, (3500.0, 6500.0), (0.15, 0.45)),
    "chirper": CallType(_chirp_series, (1800.0, 3400.0), (0.4, 1.0)),
    "triller": CallType(_trill, (2800.0, 5200.0), (0.4, 1.2)),
    "twonote": CallType(_two_note, (2200.0, 3800.0), (0.4, 0.9)),
    "honker": CallType(_harmonic_stack, (1000.0, 1700.0), (0.2, 0.6)),
    "buzzer": CallType(_buzz, (3000.0, 5800.0), (0.3, 0.9)),
}
LABELS = (*SPECIES, NOISE_LABEL)
TRAIN_COUNTS = dict(zip(LABELS, (48, 40, 34, 28, 22, 18, 14, 10, 24), strict=True))
TEST_COUNTS = dict(zip(LABELS, (14, 14, 13, 12, 12, 11, 10, 10, 12), strict=True))
MIN_COUNTS = {"train": 3, "test": 1}


def _rng(seed: int, split: str, label: str, index: int, stream: int) -> Generator:
    """Random stream of one file; stream 0 plans it, stream 1 renders its audio."""
    return np.random.default_rng([seed, SPLITS.index(split), LABELS.index(label), index, stream])


def _draw_duration(rng: Generator) -> float:
    """Mostly 3-12 s, some shorter than one 3-s chunk, some up to 30 s."""
    kind = rng.random()
    if kind < SHORT_FRACTION:
        return _uniform(rng, SHORT_S)
    if kind < SHORT_FRACTION + LONG_FRACTION:
        return _uniform(rng, LONG_S)
    return _uniform(rng, MEDIUM_S)


def _plan_file(seed: int, split: str, label: str, index: int, difficulty: Difficulty) -> DemoFile:
    """Draw the format, length, SNR and call count of one file."""
    rng = _rng(seed, split, label, index, stream=0)
    sample_rate = int(rng.choice(SAMPLE_RATES))
    fmt = "FLAC" if rng.random() < FLAC_FRACTION else "WAV"
    channels = 2 if rng.random() < STEREO_FRACTION else 1
    duration_s = round(_draw_duration(rng) * sample_rate) / sample_rate
    snr_db = _uniform(rng, difficulty.snr_db)
    n_calls = max(1, round(_uniform(rng, difficulty.calls_per_s) * duration_s))
    if label == NOISE_LABEL:
        snr_db, n_calls = float("nan"), 0
    return DemoFile(
        seed, split, label, index, sample_rate, channels, fmt, duration_s, snr_db, n_calls
    )


def file_counts(scale: float = 1.0) -> dict[str, dict[str, int]]:
    """Files per split and label; scale multiplies the counts, never below the minimum."""
    if not scale > 0:
        raise N6QATError(f"demo scale must be a positive number, got {scale!r}")
    counts = {"train": TRAIN_COUNTS, "test": TEST_COUNTS}
    return {
        split: {label: max(MIN_COUNTS[split], round(n * scale)) for label, n in per.items()}
        for split, per in counts.items()
    }


def demo_plan(
    seed: int = 42, scale: float = 1.0, difficulty: Difficulty = DEFAULT_DIFFICULTY
) -> list[DemoFile]:
    """Every file of the demo set, without rendering any audio."""
    if seed < 0:
        raise N6QATError(f"demo seed must be a non-negative integer, got {seed!r}")
    return [
        _plan_file(seed, split, label, index, difficulty)
        for split, per_label in file_counts(scale).items()
        for label, n in per_label.items()
        for index in range(n)
    ]


def _blend(band: tuple[float, float], overlap: float) -> tuple[float, float]:
    """Move a species' range toward the shared range; overlap=1 makes them all equal."""
    return (
        band[0] + overlap * (SHARED_BAND_HZ[0] - band[0]),
        band[1] + overlap * (SHARED_BAND_HZ[1] - band[1]),
    )


def synthesize_call(
    rng: Generator, label: str, sr: int, max_s: float = 2.0, overlap: float = 0.0
) -> np.ndarray:
    """One call of a species, faded in and out, at unit RMS with a little gain jitter."""
    kind = SPECIES[label]
    n = max(2, round(min(_uniform(rng, kind.length_s), max_s) * sr))
    t = np.arange(n) / sr
    wave = kind.make(rng, t, sr, _blend(kind.band_hz, overlap))
    wave = wave * _gate(t, 0.0, t[-1], min(0.02, t[-1] / 4))
    gain = 10 ** (rng.uniform(-3.0, 3.0) / 20)
    return gain * wave / max(float(np.sqrt(np.mean(wave**2))), 1e-12)


def _target_calls(rng: Generator, spec: DemoFile, overlap: float) -> tuple[np.ndarray, np.ndarray]:
    """The file's own calls, one per equal time slot, and a mask of where they sound."""
    sr, n = spec.sample_rate, spec.n_samples
    signal, active = np.zeros(n), np.zeros(n, dtype=bool)
    slot = n // spec.n_calls
    for i in range(spec.n_calls):
        call = synthesize_call(rng, spec.label, sr, 0.9 * slot / sr, overlap)
        start = i * slot + int(rng.integers(0, slot - call.size + 1))
        signal[start : start + call.size] += call
        active[start : start + call.size] = True
    return signal, active


def _add_distractors(
    rng: Generator, signal: np.ndarray, spec: DemoFile, ref_power: float, difficulty: Difficulty
) -> None:
    """Add faint calls of other species at random times, in place."""
    if rng.random() >= difficulty.distractor_prob:
        return
    others = [label for label in SPECIES if label != spec.label]
    for _ in range(1 + rng.poisson(spec.duration_s / 10)):
        label = others[int(rng.integers(len(others)))]
        call = synthesize_call(rng, label, spec.sample_rate, spec.duration_s, difficulty.overlap)
        call *= np.sqrt(ref_power) * 10 ** (_uniform(rng, difficulty.distractor_db) / 20)
        start = int(rng.integers(0, signal.size - call.size + 1))
        signal[start : start + call.size] += call


def _mean_power(spectrum: np.ndarray, n: int) -> float:
    """Mean power of the real signal whose rfft (interior bins) is spectrum."""
    return 2.0 * float(np.sum(np.abs(spectrum) ** 2)) / n**2


def _background(
    rng: Generator, n: int, sr: int, band_power: float, difficulty: Difficulty
) -> np.ndarray:
    """Pink-to-brown noise with band_power in 1-7 kHz, plus rumble below 300 Hz."""
    n_fft = next_fast_len(n, real=True)
    freqs = np.fft.rfftfreq(n_fft, 1 / sr)
    white = rng.standard_normal(freqs.size) + 1j * rng.standard_normal(freqs.size)
    audible = freqs > 20.0
    alpha = _uniform(rng, difficulty.noise_alpha)
    colour = white * audible * (np.maximum(freqs, 20.0) / 1000.0) ** (-alpha / 2)
    rumble = white * audible / (1 + (freqs / RUMBLE_CUTOFF_HZ) ** 4)
    in_band = (freqs >= BAND_HZ[0]) & (freqs <= BAND_HZ[1])
    colour *= np.sqrt(band_power / _mean_power(colour[in_band], n_fft))
    rumble_power = band_power * 10 ** (_uniform(rng, difficulty.rumble_db) / 10)
    rumble *= np.sqrt(rumble_power / _mean_power(rumble, n_fft))
    return np.fft.irfft(colour + rumble, n_fft)[:n]


def _second_channel(
    rng: Generator, source: np.ndarray, noise: np.ndarray, other_noise: np.ndarray
) -> np.ndarray:
    """A slightly different second microphone: delayed, quieter, partly other noise."""
    delay = int(rng.integers(0, 24))
    delayed = np.concatenate([np.zeros(delay), source[: source.size - delay]])
    mix = rng.uniform(0.2, 0.6)
    return rng.uniform(0.7, 1.0) * delayed + np.sqrt(1 - mix**2) * noise + mix * other_noise


def render_demo_file(spec: DemoFile, difficulty: Difficulty = DEFAULT_DIFFICULTY) -> np.ndarray:
    """The int16 frames (frames x channels) of one planned file."""
    rng = _rng(spec.seed, spec.split, spec.label, spec.index, stream=1)
    if spec.label == NOISE_LABEL:
        source, ref_power = np.zeros(spec.n_samples), 1.0
        snr_db = float(np.mean(difficulty.snr_db))
    else:
        source, active = _target_calls(rng, spec, difficulty.overlap)
        ref_power, snr_db = float(np.mean(source[active] ** 2)), spec.snr_db
    _add_distractors(rng, source, spec, ref_power, difficulty)
    band_power = ref_power / 10 ** (snr_db / 10)
    noise = _background(rng, spec.n_samples, spec.sample_rate, band_power, difficulty)
    channels = [source + noise]
    if spec.channels == 2:
        other = _background(rng, spec.n_samples, spec.sample_rate, band_power, difficulty)
        channels.append(_second_channel(rng, source, noise, other))
    frames = np.stack(channels, axis=1)
    frames *= 10 ** (_uniform(rng, PEAK_DBFS) / 20) / np.max(np.abs(frames))
    return np.round(frames * 32767).astype(np.int16)


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary name in the same folder, so no half file gets the name."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_demo_file(out_dir: Path, spec: DemoFile, difficulty: Difficulty) -> None:
    """Render one planned file and write it as 16-bit PCM WAV or FLAC."""
    frames = render_demo_file(spec, difficulty)
    path = out_dir / spec.path
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace_atomically(
        path,
        lambda tmp: sf.write(tmp, frames, spec.sample_rate, subtype="PCM_16", format=spec.format),
    )


MANIFEST_COLUMNS = (
    "path",
    "split",
    "label",
    "sample_rate",
    "channels",
    "format",
    "subtype",
    "duration_s",
    "snr_db",
    "n_calls",
)


def plan_manifest(plan: list[DemoFile]) -> pd.DataFrame:
    """One row per planned file: path, split, label, format and content."""
    rows = [{**asdict(spec), "path": spec.path, "subtype": "PCM_16"} for spec in plan]
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))


def _check_only_demo_files(out_dir: Path, plan: list[DemoFile]) -> None:
    """Refuse to mix the demo tree with files it did not plan (another scale or data)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise N6QATError(f"demo output {out_dir} is a file; give a folder path")
    planned = {out_dir / spec.path for spec in plan}
    foreign = [
        path
        for split in SPLITS
        for path in (out_dir / split).rglob("*")
        if path.is_file() and path not in planned and ".partial" not in path.name
    ]
    if foreign:
        raise N6QATError(
            f"{out_dir} holds {len(foreign)} files the demo plan does not make "
            f"(e.g. {foreign[0]}); remove the folder or choose an empty one"
        )


def generate_demo_dataset(
    out_dir: Path,
    seed: int = 42,
    scale: float = 1.0,
    difficulty: Difficulty = DEFAULT_DIFFICULTY,
    workers: int = 1,
) -> pd.DataFrame:
    """Write the demo train/test tree and manifest.csv under out_dir; return the manifest.

    Every file has its own random stream, so ``workers`` processes write the same bytes.
    """
    out_dir = Path(out_dir)
    plan = demo_plan(seed, scale, difficulty)
    _check_only_demo_files(out_dir, plan)
    if workers > 1 and len(plan) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            # list() waits for every file and re-raises the first failure.
            list(pool.map(write_demo_file, repeat(out_dir), plan, repeat(difficulty),
                          chunksize=16))  # fmt: skip
    else:
        for spec in plan:
            write_demo_file(out_dir, spec, difficulty)
    manifest = plan_manifest(plan)
    _replace_atomically(out_dir / "manifest.csv", lambda tmp: manifest.to_csv(tmp, index=False))
    return manifest
