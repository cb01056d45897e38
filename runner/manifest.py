"""A run folder's manifest: every file with its size and sha256, plus the cache key it was made under.

`manifest.json` is written LAST, so a folder without a manifest that verifies is incomplete or
damaged: it is never served from the cache and never installed. One reader (`verify`) and one
writer (`write_manifest`) for the format:

    {"key": {part: value, ...}, "files": {"relative/path": {"size": int, "sha256": hex}, ...}}
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from runner.files import read_json, write_json

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _listing(folder: Path) -> list[Path]:
    # Temporary files of interrupted atomic writes (".name.xxxx") are not part of a run.
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.name != MANIFEST
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def write_manifest(folder: Path, key: dict[str, Any]) -> Path:
    """Hash every file in `folder` and write manifest.json (atomically, as the folder's last file)."""
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in _listing(folder)
    }
    return write_json(folder / MANIFEST, {"key": key, "files": files})


def verify(folder: Path) -> str | None:
    """None when `folder`'s manifest verifies; otherwise what is wrong, in a few words."""
    try:
        manifest = read_json(folder / MANIFEST)
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest.json (the run was interrupted, or made by an older runner)"
    except (ValueError, KeyError, TypeError, OSError) as e:
        return f"unreadable manifest.json ({type(e).__name__})"
    listed = set(files)
    present = {p.relative_to(folder).as_posix() for p in _listing(folder)}
    if listed - present:
        return f"missing files: {sorted(listed - present)[:3]}"
    if present - listed:
        return f"files not in the manifest: {sorted(present - listed)[:3]}"
    for name, entry in files.items():
        path = folder / name
        if path.stat().st_size != entry.get("size") or sha256_file(path) != entry.get("sha256"):
            return f"{name} does not match its manifest entry"
    return None


def manifest_key(folder: Path) -> dict[str, Any] | None:
    """The cache key recorded in `folder`'s manifest (None when there is none)."""
    try:
        return read_json(folder / MANIFEST).get("key")
    except (FileNotFoundError, ValueError, AttributeError, OSError):
        return None
