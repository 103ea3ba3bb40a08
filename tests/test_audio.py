"""Tests for n6qat.audio: header reading and mono float32 loading at a chosen rate."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from n6qat.audio import (
    AUDIO_EXTENSIONS,
    AudioInfo,
    AudioReadError,
    has_audio_extension,
    load_audio,
    read_audio_info,
)
from n6qat.errors import N6QATError

TONE_HZ = 440.0
AMPLITUDE = 0.5

# name -> (sample rate, channels, soundfile format, subtype, lossy)
FORMATS = {
    "pcm16.wav": (22050, 1, "WAV", "PCM_16", False),
    "stereo.wav": (44100, 2, "WAV", "PCM_16", False),
    "u8.wav": (16000, 1, "WAV", "PCM_U8", False),
    "pcm24.wav": (48000, 1, "WAV", "PCM_24", False),
    "float.wav": (32000, 1, "WAV", "FLOAT", False),
    "song.flac": (44100, 1, "FLAC", "PCM_16", False),
    "song.ogg": (22050, 1, "OGG", "VORBIS", True),
    "song.mp3": (44100, 1, "MP3", "MPEG_LAYER_III", True),
    "LOUD.WAV": (8000, 1, "WAV", "PCM_16", False),
}


def tone(sample_rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    """A 440 Hz sine; in stereo the right channel is silent, so the mono mean is half."""
    t = np.arange(round(sample_rate * seconds)) / sample_rate
    wave = AMPLITUDE * np.sin(2 * np.pi * TONE_HZ * t)
    if channels == 1:
        return wave
    return np.stack([wave] + [np.zeros_like(wave)] * (channels - 1), axis=1)


def chirp(sample_rate: int, seconds: float) -> np.ndarray:
    """A rising sweep, so a window read from the wrong place does not match."""
    t = np.arange(round(sample_rate * seconds)) / sample_rate
    return AMPLITUDE * np.sin(2 * np.pi * (200 + 300 * t) * t)


CHIRPS = ("chirp.wav", "chirp.flac", "chirp.ogg", "chirp.mp3")


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One second of tone in every supported format, sample width and channel layout."""
    folder = tmp_path_factory.mktemp("audio")
    for name, (rate, channels, fmt, subtype, _) in FORMATS.items():
        sf.write(folder / name, tone(rate, 1.0, channels), rate, format=fmt, subtype=subtype)
    rate = 16000
    half_silent = np.concatenate([np.zeros(rate // 2), tone(rate, 0.5)])
    sf.write(folder / "half_silent.wav", half_silent, rate)
    for name in CHIRPS:
        sf.write(folder / name, chirp(22050, 3.0), 22050)
    (folder / "text.wav").write_text("<html>not audio</html>\n")
    return folder


def peak_frequency(signal: np.ndarray, sample_rate: int) -> float:
    """Frequency of the strongest FFT bin."""
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return float(np.fft.rfftfreq(len(signal), 1 / sample_rate)[np.argmax(spectrum)])


def rms(signal: np.ndarray) -> float:
    """Root mean square level."""
    return float(np.sqrt(np.mean(np.square(signal, dtype=np.float64))))


def test_extensions_match_case_insensitively() -> None:
    assert AUDIO_EXTENSIONS == (".wav", ".flac", ".ogg", ".mp3")
    assert has_audio_extension(Path("a/B.WAV"))
    assert has_audio_extension(Path("x.Mp3"))
    assert not has_audio_extension(Path("notes.txt"))
    assert not has_audio_extension(Path(".DS_Store"))


@pytest.mark.parametrize("name", FORMATS)
def test_read_audio_info_reports_header(audio_dir: Path, name: str) -> None:
    rate, channels, fmt, subtype, _ = FORMATS[name]
    info = read_audio_info(audio_dir / name)
    assert info == AudioInfo(rate, channels, rate, 1.0, fmt, subtype)


@pytest.mark.parametrize("name", ["text.wav", "missing.wav"])
def test_read_audio_info_raises_with_short_reason(audio_dir: Path, name: str) -> None:
    with pytest.raises(AudioReadError) as caught:
        read_audio_info(audio_dir / name)
    assert isinstance(caught.value, N6QATError)
    assert name in str(caught.value)
    assert caught.value.reason in {"Format not recognised.", "System error."}
    assert str(audio_dir) not in caught.value.reason


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("target_rate", [16000, 22050])
def test_load_audio_gives_mono_float32_at_rate(
    audio_dir: Path, name: str, target_rate: int
) -> None:
    _, channels, _, _, lossy = FORMATS[name]
    signal = load_audio(audio_dir / name, target_rate)
    assert signal.dtype == np.float32
    assert signal.ndim == 1
    assert len(signal) == target_rate  # one second
    assert peak_frequency(signal, target_rate) == pytest.approx(TONE_HZ, abs=2.0)
    expected_rms = AMPLITUDE / np.sqrt(2) / channels
    assert rms(signal) == pytest.approx(expected_rms, rel=0.1 if lossy else 0.02)


def test_load_audio_reads_only_the_requested_window(
    audio_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frames_read: list[int] = []
    original_read = sf.SoundFile.read

    def counting_read(self: sf.SoundFile, *args: object, **kwargs: object) -> np.ndarray:
        data = original_read(self, *args, **kwargs)
        frames_read.append(len(data))
        return data

    monkeypatch.setattr(sf.SoundFile, "read", counting_read)
    tail = load_audio(audio_dir / "half_silent.wav", 16000, offset=0.5, max_duration=0.25)
    head = load_audio(audio_dir / "half_silent.wav", 16000, max_duration=0.5)
    assert frames_read == [4000, 8000]
    assert len(tail) == 4000 and len(head) == 8000
    assert rms(tail) == pytest.approx(AMPLITUDE / np.sqrt(2), rel=0.02)
    assert rms(head) == 0.0


@pytest.mark.parametrize("name", CHIRPS)
@pytest.mark.parametrize("offset", [0.3, 1.4, 2.6])
def test_load_audio_window_matches_full_decode(audio_dir: Path, name: str, offset: float) -> None:
    full = load_audio(audio_dir / name, 22050)
    window = load_audio(audio_dir / name, 22050, offset=offset, max_duration=0.25)
    start = round(offset * 22050)
    assert len(window) == round(0.25 * 22050)
    np.testing.assert_allclose(window, full[start : start + len(window)], atol=1e-6)


def test_load_audio_window_is_resampled(audio_dir: Path) -> None:
    signal = load_audio(audio_dir / "pcm24.wav", 16000, offset=0.25, max_duration=0.5)
    assert len(signal) == 8000
    assert peak_frequency(signal, 16000) == pytest.approx(TONE_HZ, abs=4.0)


def test_load_audio_past_the_end_is_empty(audio_dir: Path) -> None:
    signal = load_audio(audio_dir / "song.flac", 16000, offset=5.0)
    assert signal.dtype == np.float32 and signal.shape == (0,)


def test_load_audio_rejects_negative_window(audio_dir: Path) -> None:
    with pytest.raises(N6QATError, match="must not be negative"):
        load_audio(audio_dir / "pcm16.wav", 16000, offset=-1.0)


def test_load_audio_unreadable_file_raises(audio_dir: Path) -> None:
    with pytest.raises(AudioReadError, match="text.wav"):
        load_audio(audio_dir / "text.wav", 16000)
