"""Logging for workflow scripts: everything to the rule's log, user errors also to the console."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from n6qat.errors import N6QATError


@contextmanager
def rule_logging(log_path: str, quiet_tf: bool = True) -> Iterator[logging.Logger]:
    """Send stdout, stderr (also TensorFlow's C++ output) and logging to ``log_path``.

    An ``N6QATError`` ends the script with its message (in the log and on the console,
    no traceback) and exit status 1; any other exception keeps its traceback in the log.
    A script that imported TensorFlow and finished ends here with exit status 0, without
    the interpreter's teardown of TensorFlow (about a second per job, on the DAG's
    critical path): wrap the whole script, and close every output inside the block.
    """
    if quiet_tf:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    console = os.fdopen(os.dup(2), "w")
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log_path, "a", buffering=1) as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        logging.basicConfig(
            stream=sys.stderr,
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            force=True,
        )
        logger = logging.getLogger("n6qat")
        try:
            yield logger
        except N6QATError as exc:
            logger.error("%s", exc)
            console.write(f"\nn6qat error: {exc}\n(log: {log_path})\n")
            console.flush()
            sys.exit(1)
        else:
            if "tensorflow" in sys.modules:
                log_file.flush()
                exit_without_teardown()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


def exit_without_teardown() -> None:
    """End the process now with exit status 0, once its outputs are closed: logging and
    stdio flushed, but not the interpreter's teardown of TensorFlow (about a second).

    The one exit handler that matters is done here: AutoGraph writes each function it
    converts to a ``__autograph_generated_file*.py`` in the temporary folder and deletes
    it at exit; skipped, every TensorFlow job would leave a few there.
    """
    remove_autograph_files()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def remove_autograph_files() -> None:
    """Delete the source files AutoGraph generated in this process (its modules keep
    their names and paths; its own exit handler would delete the same files)."""
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.startswith("__autograph_generated_file") and path:
            try:
                os.remove(path)
            except OSError:  # already gone
                pass
