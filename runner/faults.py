"""Test instrumentation: named kill points for the crash-safety tests (tests/test_kills.py).

With RUNNER_KILL_AT=NAME (or NAME:N) in the environment, the N-th time (default the first) this
process reaches `kill_point(NAME)` it SIGKILLs its whole process group: the runner, and the
notebook kernel it started, die at once with no chance to clean up, like a `kill -9` or a power
cut. A kill point inside a notebook kernel (which jupyter starts in a session of its own) kills
the runner's process group first, found through the kernel's JPY_PARENT_PID. Unset (always,
outside those tests) a kill point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "RUNNER_KILL_AT"
_hits: dict[str, int] = {}


def kill_point(name: str) -> None:
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    target, _, nth = wanted.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != int(nth or 1):
        return
    runner = os.environ.get("JPY_PARENT_PID")  # set by jupyter_client in a kernel it starts
    if runner:
        os.killpg(os.getpgid(int(runner)), signal.SIGKILL)
    os.killpg(os.getpgid(0), signal.SIGKILL)
