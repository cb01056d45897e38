"""runner.files.replace_dir: a whole folder swapped in atomically (exchange), or recoverably (fallback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner import files
from runner.files import recover_dir, replace_dir


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "page.md").write_text(text)
    (path / "sub").mkdir()
    (path / "sub" / "x.txt").write_text(text)
    return path


def test_exchange_swaps_in_the_new_folder_and_deletes_the_old(tmp_path) -> None:
    target = _folder(tmp_path / "docs", "old")
    inode = target.stat().st_ino
    staged = _folder(tmp_path / ".docs.staging-1", "new")
    assert files._exchange(staged, target)  # Linux with renameat2: the real atomic path is taken
    files._exchange(staged, target)  # and back again, for the test of replace_dir below
    replace_dir(staged, target)
    assert (target / "page.md").read_text() == "new" and (target / "sub" / "x.txt").read_text() == "new"
    assert target.stat().st_ino != inode and not staged.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]


def test_missing_target_is_a_plain_rename(tmp_path) -> None:
    staged = _folder(tmp_path / "stage", "new")
    replace_dir(staged, tmp_path / "site")
    assert (tmp_path / "site" / "page.md").read_text() == "new" and not staged.exists()


def test_fallback_without_exchange(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    target = _folder(tmp_path / "docs", "old")
    replace_dir(_folder(tmp_path / "stage", "new"), target)
    assert (target / "page.md").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]


def test_a_kill_between_the_fallback_renames_is_recovered(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    target = _folder(tmp_path / "docs", "old")
    staged = _folder(tmp_path / "stage", "new")
    real_rename = Path.rename

    def killed(self, dst):  # the process dies right after its first rename
        real_rename(self, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(staged, target)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not target.exists() and (tmp_path / "docs.old" / "page.md").read_text() == "old"
    recover_dir(target)  # what the next start does
    assert (target / "page.md").read_text() == "old"


def test_staged_must_exist(tmp_path) -> None:
    with pytest.raises(NotADirectoryError):
        replace_dir(tmp_path / "nope", tmp_path / "docs")
