"""Files linearize writes get the mode a plain open() gives under the user's umask, whichever library wrote
them: safetensors 0.8 writes a private 0o600 file of its own and renames it over the path, which would leave
students and exports unreadable to the other users the umask admits (a serving daemon, a shared group)."""
import os
import stat

import pytest
import torch

from linearize.files import atomic_path, save_safetensors, write_json


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    try:
        yield 0o644  # what open(path, "w") creates under it
    finally:
        os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_safetensors_files_follow_the_umask(tmp_path, umask_022):
    path = save_safetensors({"w": torch.zeros(3)}, tmp_path / "student.safetensors")
    assert _mode(path) == umask_022
    assert _mode(write_json(tmp_path / "record.json", {"a": 1})) == umask_022


def test_a_library_that_replaces_the_file_with_a_private_one_does_not_change_the_mode(tmp_path, umask_022):
    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        private = tmp_path / "private"
        fd = os.open(private, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"data")
        os.close(fd)
        os.replace(private, tmp)  # as safetensors does: its own file renamed over the path it was given
    assert target.read_bytes() == b"data" and _mode(target) == umask_022
