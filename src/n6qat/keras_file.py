"""What a model file holds, told from its bytes without importing Keras (fast enough for
the workflow's parse-time checks).

A Keras 3 checkpoint is a zip archive named ``.keras`` with ``config.json`` in it; Keras 3
still reads the legacy HDF5 format when the file is named ``.h5``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"
SAVED = "a model saved with model.save('<name>.keras') in Keras 3"


def keras_file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be loaded as a Keras checkpoint, as the rest of a sentence that
    starts with the path and ends with what to do; None when it looks loadable."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return (
            "is a folder, not a checkpoint file (Keras 3 cannot load a TensorFlow SavedModel "
            f"folder): give {SAVED}"
        )
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes): copy or download it again"
    with path.open("rb") as stream:
        head = stream.read(len(HDF5_SIGNATURE))
    if head == HDF5_SIGNATURE:
        if path.suffix == ".h5":
            return None
        return (
            "is an HDF5 file (the legacy .h5 format), which Keras 3 reads only from a file "
            f"named .h5: rename it to {path.stem}.h5, or load it and save it with "
            "model.save('<name>.keras')"
        )
    if zipfile.is_zipfile(path):
        return _archive_problem(path)
    if head.startswith(ZIP_SIGNATURE):
        return (
            f"is an incomplete zip archive ({size} bytes, its end is missing): the copy or "
            "download was cut short; copy or download it again"
        )
    return (
        "is not a Keras checkpoint (neither a .keras zip archive nor an HDF5 .h5 file): "
        f"give {SAVED}"
    )


def _archive_problem(path: Path) -> str | None:
    """The problem of a zip archive as a .keras checkpoint (None when it is one)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError) as err:
        return f"is a damaged zip archive ({err}): copy or download it again"
    if "config.json" not in names:
        return (
            f"is a zip archive without config.json, so not a Keras checkpoint: give {SAVED}"
        )
    if path.suffix != ".keras":
        return f"is a .keras archive under another name: rename it to {path.stem}.keras"
    return None
