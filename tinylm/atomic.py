"""Directories that appear complete or not at all: write into a temporary one, then publish.

Every writer of a directory a reader may open (checkpoints, exported and imported models,
merged runs, token shards) goes through `atomic_dir`, so that a crash, a full disk or Ctrl-C
never leaves a half-written directory under the final name, and all of them get the same
permissions: those `mkdir` gives under the user's umask (`tempfile.mkdtemp` alone makes 0700
directories, private to their owner).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` to disk."""
    for file in sorted(path.rglob("*")):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def fsync_dir(path: Path, strict: bool = True) -> None:
    """Make the renames in `path` durable. Platforms that cannot sync a directory are
    skipped; other errors (a failing disk) raise when `strict`."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if strict and exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, prefix: str | None = None, durable: bool = False,
               replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory beside `target`; when the block completes it
    becomes `target`.

    An existing `target` is replaced, and removed only once the new one is in place, so a
    failure at any point leaves either the old directory or the new one, never neither. On an
    exception the temporary directory is removed and `target` is untouched. `prefix` names
    the temporary directory (default `.NAME.`, hidden); `durable` flushes the files and the
    rename to disk (for checkpoints, which hold hours of work). With `replace` False a
    `target` that another process completed meanwhile wins (a cache entry: both are equal).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{target.name}.", dir=target.parent))
    try:
        tmp.chmod(_umask_mode())
        yield tmp
        if durable:
            fsync_tree(tmp)
        if not replace:
            try:
                os.rename(tmp, target)  # fails when another process published it first
            except OSError:
                if not target.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            return
        old = tmp.with_name(f"{tmp.name}-old") if target.exists() else None
        if old is not None:
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)  # put the old directory back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if durable:
            fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
