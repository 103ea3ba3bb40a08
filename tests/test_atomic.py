"""Outputs are written under a temporary name and renamed; a failed write leaves nothing."""

import errno
from pathlib import Path

import pytest

from n6qat.atomic import atomic_path, write_bytes, write_text
from n6qat.errors import N6QATError


def test_a_failed_block_keeps_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "out.json"
    write_text(target, "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    real = Path.write_bytes

    def full_after_half(self, data):
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full_after_half)
    with pytest.raises(N6QATError) as caught:
        write_bytes(tmp_path / "model.tflite", b"\x00" * 1000)
    assert str(caught.value).startswith(
        f"no space left on the device while writing {tmp_path / 'model.tflite'} "
        "(No space left on device); nothing was written under that name. Free space"
    )
    assert list(tmp_path.iterdir()) == []


def test_other_os_errors_pass_unchanged(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_text(tmp_path / "no_such_folder" / "x.txt", "x")
