"""`n6qat check`: report on stdout, JSON on request, exit status 0 / 1 / 2."""

import json
import subprocess
import sys

import numpy as np
import pytest

from n6qat.cli import main
from n6qat.convert import convert_int8
from n6qat.validation_npz import save_validation_npz

INPUT_SHAPE = (12, 12, 3)


def _convert(upsample: bool):
    """(Keras model, its full-INT8 .tflite bytes)."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inputs = keras.Input(INPUT_SHAPE)
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    if upsample:
        x = layers.UpSampling2D(interpolation="bilinear")(x)  # a CPU op mid-graph
    x = layers.Conv2D(16, 3, strides=2)(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(8, activation="sigmoid")(x))
    calibration = np.random.default_rng(0).normal(size=(8, *INPUT_SHAPE)).astype(np.float32)
    return model, convert_int8(model, calibration)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clean")
    model, data = _convert(upsample=False)
    path, npz = folder / "clean.tflite", folder / "clean.npz"
    path.write_bytes(data)
    x = np.random.default_rng(1).normal(size=(6, *INPUT_SHAPE)).astype(np.float32)
    save_validation_npz(npz, x, model.predict(x, verbose=0))
    return path, npz


@pytest.fixture(scope="module")
def flawed(tmp_path_factory):
    path = tmp_path_factory.mktemp("flawed") / "flawed.tflite"
    path.write_bytes(_convert(upsample=True)[1])
    return path


def test_a_clean_model_exits_0_and_writes_json(clean, tmp_path, capsys):
    out = tmp_path / "reports/clean.json"
    assert main(["check", str(clean[0]), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verdict: N6-clean (0 errors" in printed and "Operators in execution order" in printed
    data = json.loads(out.read_text())
    assert data["clean"] is True and data["operators"][1]["opcode"] == "CONV_2D"
    assert data["metrics"] is None


def test_validation_data_adds_the_metrics_table(clean, capsys):
    assert main(["check", str(clean[0]), "--validation-data", str(clean[1])]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("Output"))
    assert header.split() == ["Output", "acc", "rmse", "mae", "l2r", "mean", "std", "nse", "cos"]
    assert "HOST int8 vs float" in printed and "6 samples" in printed


def test_a_model_with_errors_exits_1(flawed, capsys):
    assert main(["check", str(flawed)]) == 1
    printed = capsys.readouterr().out
    assert "NOT N6-clean" in printed and "RESIZE_BILINEAR runs on the CPU in mid-graph" in printed


def test_unusable_inputs_exit_2_with_a_message(clean, tmp_path, capsys):
    text = tmp_path / "notes.tflite"
    text.write_text("not a model\n" * 10)
    cut = tmp_path / "cut.tflite"
    cut.write_bytes(clean[0].read_bytes()[:200])
    cases = {
        text: "is not a TFLite model",
        cut: "is truncated",
        tmp_path / "absent.tflite": "cannot read TFLite model",
    }
    for path, words in cases.items():
        assert main(["check", str(path)]) == 2
        assert words in capsys.readouterr().err
    assert main(["check", str(clean[0]), "--validation-data", str(text)]) == 2
    assert "cannot read validation data" in capsys.readouterr().err
    assert main(["check", str(clean[0]), "--json", str(tmp_path)]) == 2  # a folder
    assert "cannot write" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as stopped:
        main([])
    assert stopped.value.code == 2 and "usage: n6qat" in capsys.readouterr().err


def test_the_module_runs_as_a_command_without_traceback(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00" * 64)
    done = subprocess.run(
        [sys.executable, "-m", "n6qat.cli", "check", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("n6qat check: ") and "bad.tflite" in done.stderr
