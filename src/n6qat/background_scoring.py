"""INT8 TFLite scoring of QAT epochs in a second process, while the next epoch trains.

QAT scores every epoch on its converted full-INT8 TFLite (``qat.select_with: tflite``).
The conversion and the LiteRT run over the validation chunks take one core for about as
long as a train epoch, and the train step leaves the second core mostly idle. A
``BackgroundScorer`` runs them in one worker process, a fresh interpreter started with
``python -m`` (forking a process that runs TensorFlow is not safe, and multiprocessing's
spawn would run the caller's main script again). The worker gets the model once, as a
``.keras`` file in a temporary folder, with the calibration set and the validation
files (it deletes that folder once it has read it, so a training process killed
with SIGKILL leaves none behind), and then only each epoch's weights over a pipe. It
converts exactly as the training process would (``convert_int8(..., signature=False)``
on the same weights and calibration set, on one thread), so the metrics are the same
numbers (tested); ``n6qat.fit.fit_epochs`` takes an epoch's metrics once the next epoch
has trained. The worker ends when the pipe closes, also when the training process is
killed, without TensorFlow's interpreter teardown.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection, Pipe
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from n6qat.errors import N6QATError

if TYPE_CHECKING:
    import keras
    import pandas as pd

log = logging.getLogger(__name__)


class BackgroundScorer:
    """Converts and validates weights of ``model`` in a worker process.

    ``submit(weights)`` returns a future at once; its ``result()`` is the ``val_int8_*``
    metrics of those weights (or the worker's error), in the order submitted. Use as a context
    manager (or call ``close``): the worker and the temporary folder go away with it.
    """

    def __init__(
        self,
        model: keras.Model,
        calibration: np.ndarray,
        per_channel: bool,
        io_dtype: str,
        features: np.ndarray,
        chunks: pd.DataFrame,
        labels: list[str],
        pooling: str,
        threshold: float,
    ):
        from n6qat.model import save_model

        # The worker removes the folder once it has read it; this is the fallback.
        self._folder = tempfile.TemporaryDirectory(
            prefix="n6qat_scoring_", ignore_cleanup_errors=True
        )
        self._process = None
        folder = Path(self._folder.name)
        try:
            save_model(model, folder / "model.keras")
            np.save(folder / "calibration.npy", np.asarray(calibration, dtype=np.float32))
            np.save(folder / "features.npy", np.asarray(features, dtype=np.float32))
            self._conn, theirs = Pipe()
            # A fresh interpreter (`python -m`), not multiprocessing's spawn: that would
            # run the caller's main script again (a Snakemake rule script, for one).
            package_root = str(Path(__file__).resolve().parents[1])
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                filter(None, [package_root, os.environ.get("PYTHONPATH")]))}  # fmt: skip
            self._process = subprocess.Popen(
                [sys.executable, "-m", "n6qat.background_scoring", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL,
            )
            theirs.close()  # the worker sees the end of the pipe when this process ends
            log.info("INT8 scoring worker started (pid %d)", self._process.pid)
            self._conn.send({
                "folder": str(folder), "per_channel": per_channel, "io_dtype": io_dtype,
                "chunks": chunks, "labels": list(labels), "pooling": pooling,
                "threshold": threshold,
            })  # fmt: skip
            # One thread talks to the worker, so jobs queue in order and never block training.
            self._talker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="n6qat-scoring")
        except BaseException:
            self.close()
            raise

    def submit(self, weights: list[np.ndarray]) -> Future:
        """Score ``weights`` (``model.get_weights()`` order) in the worker."""
        return self._talker.submit(self._ask, [np.asarray(w) for w in weights])

    def _ask(self, weights: list[np.ndarray]) -> dict[str, float]:
        try:
            self._conn.send(weights)
            kind, value = self._conn.recv()
        except (EOFError, OSError) as err:
            raise _died(self._process, err) from err
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        talker = getattr(self, "_talker", None)
        if talker is not None:
            talker.shutdown(wait=True, cancel_futures=True)
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()  # the worker's next read ends it
        if self._process is not None:
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._folder.cleanup()

    def __enter__(self) -> BackgroundScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _died(process, err: BaseException) -> N6QATError:
    code = process.poll() if process is not None else None
    return N6QATError(
        f"the INT8 scoring worker process ended (exit status {code}; {err}); it converts "
        "and runs each QAT epoch's TFLite, so it needs about as much memory as the "
        "convert_int8 rule. Rerun (the run resumes after the last backed-up epoch), or set "
        "qat.select_with: simulation to score in the training process"
    )


def _serve(conn: Connection) -> None:
    """The worker: set up from the first message, then score each weights list sent."""
    setup = conn.recv()
    from n6qat.train import configure_runtime

    configure_runtime(1)
    from n6qat.convert import convert_int8
    from n6qat.evaluate import validation_metrics
    from n6qat.litert import run_tflite
    from n6qat.model import load_model

    folder = Path(setup["folder"])
    model = load_model(folder / "model.keras")
    calibration = np.load(folder / "calibration.npy")
    features = np.load(folder / "features.npy")
    shutil.rmtree(folder, ignore_errors=True)  # read: nothing is left if both are killed
    while True:
        try:
            weights = conn.recv()
        except EOFError:
            return
        try:
            model.set_weights(weights)
            tflite = convert_int8(
                model, calibration, setup["per_channel"], setup["io_dtype"], signature=False
            )
            reply = ("ok", validation_metrics(
                run_tflite(tflite, features), setup["chunks"], setup["labels"],
                setup["pooling"], setup["threshold"], prefix="val_int8_",
            ))  # fmt: skip
        except Exception as err:  # noqa: BLE001 - raised again in the training process
            reply = ("error", err if _picklable(err) else N6QATError(repr(err)))
        conn.send(reply)


def _picklable(err: BaseException) -> bool:
    import pickle

    try:
        pickle.loads(pickle.dumps(err))
    except Exception:  # noqa: BLE001
        return False
    return True


if __name__ == "__main__":
    from n6qat.rulelog import exit_without_teardown

    _serve(Connection(int(sys.argv[1])))
    exit_without_teardown()  # every reply is sent; `close` would wait for the teardown
