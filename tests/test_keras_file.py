"""Telling what a model file is from its bytes, before Keras is imported."""

import io
import zipfile

import pytest

from n6qat.keras_file import HDF5_SIGNATURE, keras_file_problem


def zipped(*names: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in names:
            archive.writestr(name, "{}")
    return buffer.getvalue()


# case: (file name, its bytes (None: no file), the problem's start)
CASES = {
    "missing": ("m.keras", None, "does not exist"),
    "empty": ("m.keras", b"", "is empty (0 bytes)"),
    "no config": ("m.keras", zipped("model.weights.h5"), "is a zip archive without config.json"),
    "misnamed zip": ("m.zip", zipped("config.json"), "is a .keras archive under another name: "
                     "rename it to m.keras"),
    "h5 as keras": ("m.keras", HDF5_SIGNATURE + bytes(8), "is an HDF5 file (the legacy .h5 "
                    "format), which Keras 3 reads only from a file named .h5: rename it to m.h5"),
    "truncated": ("m.keras", zipped("config.json")[:40], "is an incomplete zip archive (40 bytes, "
                  "its end is missing)"),
    "text": ("m.keras", b"<html>", "is not a Keras checkpoint"),
}


@pytest.mark.parametrize("case", CASES)
def test_problems_say_what_the_file_is(tmp_path, case):
    name, content, problem = CASES[case]
    if content is not None:
        (tmp_path / name).write_bytes(content)
    assert keras_file_problem(tmp_path / name).startswith(problem)


def test_a_folder_is_no_checkpoint(tmp_path):
    assert keras_file_problem(tmp_path).startswith("is a folder, not a checkpoint file")


def test_loadable_files_have_no_problem(tmp_path):
    (tmp_path / "m.keras").write_bytes(zipped("config.json", "metadata.json"))
    (tmp_path / "m.h5").write_bytes(HDF5_SIGNATURE + bytes(8))
    assert keras_file_problem(tmp_path / "m.keras") is None
    assert keras_file_problem(tmp_path / "m.h5") is None
