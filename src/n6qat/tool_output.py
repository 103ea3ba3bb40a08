"""What native code and external tools print: capturing the C++ side's stderr (the TFLite
converter, LiteRT) and quoting the tail of a tool's output in an error message."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Captured:
    """The text collected by `native_stderr_captured`, set when its block ends."""

    text: str = ""


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[Captured]:
    """Collect what C++ code (TF logging, the MLIR converter) writes to file descriptor 2.

    Python warnings raised meanwhile are collected as well. The redirect is process-wide
    for its duration, so another thread's stderr lands here too.
    """
    captured = Captured()
    sys.stderr.flush()
    try:
        saved_fd = os.dup(2)
    except OSError:  # no usable stderr (closed by a daemon): nothing to capture
        yield captured
        return
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            sink.seek(0)
            lines = [sink.read().decode("utf-8", "replace")]
            lines += [f"{w.category.__name__}: {w.message}" for w in caught]
            captured.text = "\n".join(line.rstrip("\n") for line in lines if line)


def last_lines(text: str, count: int) -> str:
    """The last `count` lines of `text`, surrounding blank space dropped."""
    return "\n".join(text.strip().splitlines()[-count:])
