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


# ---------------------------------------------------------------- swapping a whole folder in

_RENAME_EXCHANGE = 2  # linux/fs.h: atomically exchange two existing paths
_AT_FDCWD = -100
OLD_SUFFIX = ".old"  # fallback scheme: `target` sits here while `staged` is being renamed into place


def _exchange(a: Path, b: Path) -> bool:
    """renameat2(a, b, RENAME_EXCHANGE): True when the kernel swapped the two paths, False when the
    call is unavailable (not Linux, old kernel or libc, or a filesystem without exchange support)."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


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
    if not target.exists():
        staged.rename(target)
        return
    if _exchange(staged, target):
        shutil.rmtree(staged)
        return
    old = target.with_name(target.name + OLD_SUFFIX)
    target.rename(old)
    staged.rename(target)
    shutil.rmtree(old)
