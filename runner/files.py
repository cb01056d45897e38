"""Atomic file writes: a reader never sees half a file, and a crash never leaves one behind."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner.faults import kill_point


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file in `path`'s folder, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: non-finite floats become null, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(finite_or_none(data), indent=1, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


class ExchangeUnsupported(OSError):
    """This platform or filesystem cannot swap two paths in one step."""


def exchange_dirs(a: Path, b: Path) -> None:
    """Swap two existing paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE).

    After a crash at any instant each name holds one complete folder: either both as before or
    both swapped. Raises ExchangeUnsupported where the kernel, libc or filesystem lacks it.
    """
    import ctypes
    import ctypes.util
    import errno
    import sys

    if not sys.platform.startswith("linux"):
        raise ExchangeUnsupported(errno.ENOSYS, "renameat2 is Linux only")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc before 2.28
        raise ExchangeUnsupported(errno.ENOSYS, "libc has no renameat2")
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise ExchangeUnsupported(err, f"renameat2 exchange: {os.strerror(err)}", str(a))
        raise OSError(err, os.strerror(err), str(a), None, str(b))


# ---------------------------------------------------------------- swapping a whole folder in

OLD_SUFFIX = ".old"  # fallback scheme: `target` sits here while `staged` is being renamed into place


def _exchange(a: Path, b: Path) -> bool:
    """`exchange_dirs`, or False where the platform cannot swap in one step."""
    try:
        exchange_dirs(a, b)
    except ExchangeUnsupported:
        return False
    return True


def recover_dir(target: Path) -> None:
    """Finish what a killed fallback `replace_dir` left: `target` missing but `target.old` present means
    the kill came between its two renames, so the previous complete folder goes back into place."""
    target = Path(target)
    old = target.with_name(target.name + OLD_SUFFIX)
    if old.is_dir() and not target.exists():
        old.rename(target)
    elif old.is_dir():
        shutil.rmtree(old)


def replace_dir(staged: Path, target: Path) -> None:
    """Put the complete folder `staged` at `target` so that a reader (or a kill at any instant) sees
    either the previous `target` or the new one, never a mix; then delete the previous one.

    `staged` must be on `target`'s filesystem (make it beside `target`). On Linux one
    renameat2(RENAME_EXCHANGE) swaps the two folders atomically, after which `staged` holds the old
    content and is deleted (a kill before that leaves only a stale staging folder, which the caller
    cleans at its next start). Where exchange is unsupported the fallback is two renames,
    target -> target.old and staged -> target: a kill between them leaves target missing and
    target.old complete, which `recover_dir(target)` (call it at start) renames back.
    """
    staged, target = Path(staged), Path(target)
    if not staged.is_dir():
        raise NotADirectoryError(f"replace_dir: staged folder {staged} does not exist")
    recover_dir(target)
    kill_point("swap")  # crash-safety tests: killed before the swap (each swap reaches this point twice)
    if not target.exists():
        staged.rename(target)
        return
    if _exchange(staged, target):
        kill_point("swap")  # swapped, the previous folder (now in `staged`) not yet deleted
        shutil.rmtree(staged)
        return
    old = target.with_name(target.name + OLD_SUFFIX)
    target.rename(old)
    kill_point("swap")  # between the fallback's two renames
    staged.rename(target)
    shutil.rmtree(old)
