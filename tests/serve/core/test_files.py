"""Atomic writes, staged folders, the publishing lock, and clear errors on a full disk."""

from __future__ import annotations

import errno
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from serve.core.files import (
    WriteError,
    atomic_write,
    atomic_write_text,
    locked,
    publish_dir,
    remove_stale_temp_files,
    staged_dir,
)


def test_a_failed_write_keeps_the_old_file_and_names_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "config.pbtxt"
    atomic_write_text(path, "old")

    def disk_full(f) -> None:
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=r"cannot write .*config.pbtxt: no space left"):
        atomic_write(path, disk_full)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.pbtxt"]


def test_staged_folder_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    with staged_dir(tmp_path) as staging:
        (staging / "a").write_text("1")
        publish_dir(staging, tmp_path / "1")
    assert (tmp_path / "1" / "a").read_text() == "1"
    with pytest.raises(RuntimeError), staged_dir(tmp_path) as staging:
        (staging / "b").write_text("2")
        raise RuntimeError("copy failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]  # the stage is gone
    with staged_dir(tmp_path) as staging, pytest.raises(WriteError, match="cannot publish"):
        publish_dir(staging, tmp_path / "1")  # never replaces an existing version


def _hold(folder: str, marker: str, release: str) -> None:
    """Hold the lock until the test creates `release` (a condition, not a duration)."""
    with locked(folder):
        Path(marker).write_text("held")
        deadline = time.monotonic() + 120
        while not Path(release).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        Path(marker).write_text("released")


def test_lock_serializes_publishers(tmp_path: Path) -> None:
    marker, release = tmp_path / "held", tmp_path / "release"
    p = multiprocessing.get_context("spawn").Process(
        target=_hold, args=(str(tmp_path / "m"), str(marker), str(release))
    )
    p.start()
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert time.monotonic() < deadline and p.is_alive(), "the holder never locked"
            time.sleep(0.02)
        with (
            pytest.raises(TimeoutError, match="locked by another"),
            locked(tmp_path / "m", timeout=0.1),
        ):
            pass
        release.touch()
        with locked(tmp_path / "m", timeout=60):  # waits for the holder, then gets it
            assert marker.read_text() == "released"
    finally:
        release.touch()
        p.join(60)
    assert p.exitcode == 0


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / f".last.pt.{2**22 + 1}.abcd1234.tmp"  # no such pid
    mine = tmp_path / f".last.pt.{os.getpid()}.abcd1234.tmp"
    keep = tmp_path / "last.pt"
    for p in (dead, mine, keep):
        p.write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path) == [dead]
    assert mine.exists() and keep.exists()
