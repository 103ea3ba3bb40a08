"""The INT8 scoring worker: its errors reach the training process, and it never outlives it."""

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from n6qat.background_scoring import BackgroundScorer  # noqa: E402


def _scorer() -> BackgroundScorer:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Conv2D(2, 3, padding="same", activation="relu")(inputs)
    outputs = keras.layers.Dense(2, activation="sigmoid")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(size=(8, 4, 4, 1)).astype(np.float32)
    chunks = pd.DataFrame({"source": "val", "path": [f"f{i // 2}.wav" for i in range(8)],
                           "label_index": np.repeat(np.arange(4) % 2, 2), "row": np.arange(8)})
    return model, BackgroundScorer(model, x, True, "float32", x, chunks, ["a", "b"], "mean", 0.5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_worker_scores_and_raises_its_errors_in_the_caller():
    model, scorer = _scorer()
    with scorer:
        good = scorer.submit(model.get_weights())
        bad = scorer.submit([np.zeros(3, np.float32)])  # not this model's weights
        metrics = good.result()
        assert set(metrics) >= {"val_int8_file_top1", "val_int8_file_cmap"}
        with pytest.raises(ValueError):
            bad.result()
        # Still serving after an error.
        assert scorer.submit(model.get_weights()).result() == metrics
        worker = scorer._process
    assert worker.poll() == 0  # closed with the scorer


def test_the_worker_ends_when_the_training_process_is_killed(tmp_path):
    """...and leaves no temporary folder behind (it deletes its inputs once read)."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_background_scoring import _scorer
        _, scorer = _scorer()
        print(scorer._folder.name, scorer._process.pid, flush=True)
        os._exit(0)  # no clean-up, as after SIGKILL
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, cwd=tmp_path, timeout=120).stdout  # fmt: skip
    folder, pid = out.split()[-2], int(out.split()[-1])
    deadline = time.monotonic() + 60
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid)
    assert not os.path.exists(folder)
