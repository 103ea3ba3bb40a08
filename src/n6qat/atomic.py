"""Writing outputs so that an interrupted write never leaves a file that looks finished."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from n6qat.errors import N6QATError

_DEVICE_FULL = {errno.ENOSPC, errno.EDQUOT}


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix), renamed onto it when the block succeeds.

    The rename is atomic on one filesystem; on an exception the temporary file is removed
    and ``path`` is left as it was. A full disk (or quota) becomes an N6QATError naming
    ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        if err.errno not in _DEVICE_FULL:
            raise
        raise N6QATError(
            f"no space left on the device while writing {path} ({err.strerror}); nothing "
            f"was written under that name. Free space on it (df -h {path.parent}) and run "
            "the workflow again."
        ) from err
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Bytes under a temporary name, renamed when complete."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Text under a temporary name, renamed when complete."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: str | Path, table, index: bool = False) -> None:
    """A pandas DataFrame as CSV under a temporary name, renamed when complete."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=index)
