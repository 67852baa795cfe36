"""How a shard's start can fail, and what it tells its launcher.

Some failures a restart cannot fix: settings the checkpoint cannot take, a checkpoint that does not
match its config, a missing file. The shard exits with `CONFIG_EXIT` after one line of reason
(written to `--reason-file` when a launcher reads it and prints it once for the whole group, else
logged), and the launcher stops instead of restarting. Anything else (a rendezvous that broke, out
of memory) exits with 1 and may be restarted. Tracebacks are logged at debug level only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import structlog

log = structlog.get_logger("shardline.shard")
# sysexits.h EX_CONFIG: the settings or the checkpoint are wrong; restarting cannot help.
CONFIG_EXIT = 78


class CannotLoad(Exception):
    """Loading failed for a reason a restart cannot fix; the message says which."""


@contextlib.contextmanager
def unfixable_errors(model_dir: Path) -> Iterator[None]:
    """Turns a failure to build or load the model into CannotLoad, except running out of memory
    (which another process may have caused, and a restart may not meet again)."""
    import torch

    try:
        yield
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:
        raise CannotLoad(f"cannot load the model from {model_dir}: {one_line(exc)}") from exc


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (some libraries' messages span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def write_reason(reason_file: Path | None, reason: str) -> None:
    if reason_file is not None:
        with contextlib.suppress(OSError):
            reason_file.write_text(reason + "\n")


def report_failure(exc: BaseException, reason_file: Path | None) -> int:
    """Logs why the start failed (one line; the traceback at debug level) and returns the exit code."""
    log.debug("shard start failed", exc_info=exc)
    reason = one_line(exc)
    if isinstance(exc, (CannotLoad, ValueError)):
        if reason_file is not None:
            write_reason(reason_file, reason)  # the launcher prints it, once for the whole group
        else:
            log.error("shard cannot start; restarting will not help", reason=reason, exit_code=CONFIG_EXIT)
        return CONFIG_EXIT
    log.error("shard failed to start", reason=reason)
    return 1
