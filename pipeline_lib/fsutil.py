"""Atomic outputs: a failed step leaves nothing that a later step would take for good.

Two ways to replace a folder: `atomic_dir` swaps the whole folder (a DVC stage owns its outs, so
nothing else may live there), `atomic_files` replaces only the files it writes (a CLI command writes
into a folder the user owns, which may hold anything). Everything written here gets the modes an
ordinary `open()` / `mkdir()` would give under the process umask (files 0666 & ~umask, folders
0777 & ~umask), not the private 0600 / 0700 of `tempfile`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from pipeline_lib.errors import InputError


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)  # elsewhere the only way to read it is to set it (briefly)
    os.umask(umask)
    return umask


def file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0666 & ~umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode `mkdir` gives a new folder: 0777 & ~umask."""
    return 0o777 & ~current_umask()


def _fix_modes(root: Path) -> None:
    """Give ``root`` (a file or a folder tree) the modes `open()` / `mkdir()` give under the umask:
    folders 0777 & ~umask, files 0666 & ~umask plus any execute bits they had (as far as the umask
    allows). tempfile's private 0600 / 0700 and whatever a copy carried over are replaced. Links are
    left alone."""
    fmode, dmode = file_mode(), dir_mode()

    def fix(p: Path) -> None:
        if p.is_symlink():
            return
        p.chmod(dmode if p.is_dir() else fmode | (p.stat().st_mode & 0o111 & dmode))

    fix(root)
    if root.is_dir() and not root.is_symlink():
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                fix(Path(dirpath, name))


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_file(path: Path | str, what: str = "output file") -> Path:
    """Raise InputError unless ``path`` can be written as a file: its folder exists and is writable,
    and ``path`` is not a folder (a file is created there and removed, to be sure). Call it before the
    work whose result goes there."""
    path = Path(path)
    parent = Path(os.path.abspath(path)).parent
    if path.is_dir():
        raise InputError(f"{what} {path}: is a folder; give a file name inside it, e.g. {path / 'out.wav'}")
    if not parent.is_dir():
        found = "a file" if parent.exists() else "missing"
        raise InputError(f"{what} {path}: its folder {parent} is {found}; create the folder first (mkdir -p {parent}) "
                         "or choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path}: folder {parent} is not writable; choose a folder you can write to")
    _probe(parent, what, path)
    return path


def _probe(folder: Path, what: str, path: Path) -> None:
    """Create and remove a file in ``folder``: os.access says yes to root everywhere, even where the
    file system refuses (a read-only mount, /sys, /proc)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".soprano-probe-", dir=folder)
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot create a file in {folder} ({exc.strerror or exc}); "
                         "choose a folder you can write to") from None
    os.close(fd)
    os.unlink(name)


def check_output_dir(path: Path | str, what: str = "output folder") -> Path:
    """Raise InputError unless ``path`` is a writable folder or can be created (its nearest existing
    ancestor is a writable folder: a file is created there and removed, to be sure). Call it before the
    work whose result goes there."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path}: exists and is not a folder; remove it or choose another path")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise InputError(f"{what} {path}: {base} is a file, so the folder cannot be created there; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path}: {base} is not writable; choose a folder you can write to")
    _probe(base, what, path)
    return path


@contextlib.contextmanager
def atomic_dir(final: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` as a whole, on error it is removed.

    For outputs the caller owns entirely (DVC stage outs): whatever ``final`` held before is gone
    afterwards. The old ``final`` (if any) is removed only once the new content is complete. Writing
    into a folder that may hold other files (a user's folder): use `atomic_files`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        _fix_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists() or final.is_symlink():
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        else:
            final.unlink()
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_files(final: Path | str) -> Iterator[Path]:
    """Yield a temporary folder; on success each file written there replaces its namesake in ``final``
    (``os.replace``, one file at a time), on error it is removed and ``final`` is untouched.

    Files in ``final`` that the caller did not write stay as they were, byte for byte. A ``final``
    that does not exist yet is created (with the whole new folder renamed into place). The temporary
    folder lies inside ``final`` when that exists (same file system, so every move is a rename),
    else beside it. Subfolders written there are merged file by file the same way.
    """
    final = Path(os.path.abspath(final))
    check_output_dir(final)
    if final.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=".soprano-tmp-", dir=final))
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        _fix_modes(tmp)
        if tmp.parent != final and not final.exists():
            os.replace(tmp, final)
            return
        _merge_into(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _merge_into(src: Path, dst: Path) -> None:
    """Move every file under ``src`` to the same relative path under ``dst``; checks every target first,
    so a clash (a folder where a file goes, or the reverse) moves nothing."""
    moves: list[tuple[Path, Path]] = []
    for dirpath, _, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        target_dir = dst / rel
        if target_dir.exists() and not target_dir.is_dir():
            raise InputError(f"{target_dir}: is a file where the output needs a folder; remove it or choose another folder")
        for name in filenames:
            target = target_dir / name
            if target.is_dir() and not target.is_symlink():
                raise InputError(f"{target}: is a folder where the output writes a file; remove it or choose another folder")
            moves.append((Path(dirpath, name), target))
    for source, target in moves:
        if not target.parent.is_dir():
            target.parent.mkdir(parents=True)
            target.parent.chmod(dir_mode())
        os.replace(source, target)


@contextlib.contextmanager
def atomic_file(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; it is renamed onto ``final`` only on success (with the
    umask's file mode), and removed on error, leaving any old ``final`` as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fix_modes(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)


def write_json(path: Path | str, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def remove_outputs(*paths: Path | str) -> None:
    """Delete stale outputs before a stage runs, so a failure cannot leave an old file looking new.

    Stage outs only: the stage owns them (DVC deletes them before the stage runs anyway)."""
    for p in map(Path, paths):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
