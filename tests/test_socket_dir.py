"""The folder of launch's shard sockets (router/group/socket_dir.py): created 0700, and an existing one
that others could enter, that another user owns, or that is a link, is refused naming the flag."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shardline.router.group.socket_dir import private_socket_dir
from shardline.shard.preflight import SettingsError


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_folder_is_created_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o000)
    try:
        made = private_socket_dir(tmp_path / "deep" / "sockets")
    finally:
        os.umask(old)
    assert made == tmp_path / "deep" / "sockets" and mode(made) == 0o700


def test_the_default_is_a_fresh_private_folder(tmp_path: Path) -> None:
    first, second = private_socket_dir(None), private_socket_dir(None)
    assert first != second and mode(first) == 0o700 and first.stat().st_uid == os.geteuid()
    first.rmdir(), second.rmdir()


@pytest.mark.parametrize("bits", [0o755, 0o750, 0o701, 0o1777])
def test_an_existing_folder_others_may_enter_is_refused(tmp_path: Path, bits: int) -> None:
    folder = tmp_path / "sockets"
    folder.mkdir()
    folder.chmod(bits)
    with pytest.raises(SettingsError) as refused:
        private_socket_dir(folder)
    assert str(refused.value) == (f"--socket-dir {folder} has mode {bits:04o}: other users may "
                                  f"enter it and call the shards; `chmod 700 {folder}`, or choose another folder")
    folder.chmod(0o700)
    assert private_socket_dir(folder) == folder


def test_a_folder_of_another_user_or_a_link_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(SettingsError, match="is not a directory"):
        private_socket_dir(link)
    if os.geteuid() != 0:
        pytest.skip("only root can give a folder to another user")
    os.chown(target, 12345, 12345)
    with pytest.raises(SettingsError, match=r"belongs to uid 12345, not to this user \(uid 0\)"):
        private_socket_dir(target)


def test_the_default_folder_is_gone_after_exit(tmp_path: Path) -> None:
    code = "from shardline.router.group.socket_dir import private_socket_dir; print(private_socket_dir(None))"
    made = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TMPDIR": str(tmp_path)}, check=True).stdout.strip()
    assert made.startswith(str(tmp_path)) and not Path(made).exists()
