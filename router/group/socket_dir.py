"""The folder of `shardline launch`'s shard sockets: private to the user that runs it.

A shard's unix socket is its whole API (Step, Reset, ...), so the folder it lives in must let
nobody else in: it is created with mode 0700, and an existing folder is used only when it is a
real directory (not a link) owned by this user that no one else may read, write or enter.
Without --socket-dir a fresh folder is made in the temporary directory and removed at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import stat
import tempfile
from pathlib import Path

from shardline.shard.preflight import SettingsError


def check_private(path: Path) -> None:
    """Raises SettingsError (one line naming --socket-dir) unless `path` is this user's alone."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise SettingsError(f"--socket-dir {path} is not a directory (a symbolic link is refused too)")
    if info.st_uid != os.geteuid():
        raise SettingsError(f"--socket-dir {path} belongs to uid {info.st_uid}, not to this "
                         f"user (uid {os.geteuid()}): its owner could reach the shards; use a folder of your own")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise SettingsError(f"--socket-dir {path} has mode {mode:04o}: other users may enter it "
                         f"and call the shards; `chmod 700 {path}`, or choose another folder")


def private_socket_dir(path: Path | None) -> Path:
    """The folder for the shards' sockets: `path` (created 0700 if missing, checked if it exists;
    it stays), or a fresh temporary one, removed at exit when it is empty."""
    if path is None:
        fresh = Path(tempfile.mkdtemp(prefix="shardline-sockets-"))  # mkdtemp: 0700
        atexit.register(_remove_if_empty, fresh)
        return fresh
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
        os.chmod(path, 0o700)  # whatever the umask
    except FileExistsError:
        pass
    check_private(path)
    return path


def _remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()
