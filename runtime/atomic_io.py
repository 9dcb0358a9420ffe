"""Files that a crash, a kill or a full disk never leave half-written under their name.

A reader trusts a file by its name, so a name only ever points at whole contents. Each file
is written to a hidden sibling (``.NAME.tmp-PID-RANDOM.EXT``: the same directory, so the
rename never crosses filesystems; the extension kept for writers that infer a format from
it), flushed and fsynced, moved over the name with ``os.replace`` (atomic on POSIX), and
the directory is fsynced so that the rename itself survives a power loss. An interrupted
write leaves the old file (or none) and a temporary sibling that nothing reads; the next
write of that name removes siblings old enough to have no live writer.

Files that belong together (exit heads and their manifest) are each written this way, the
one that vouches for the others last (the manifest, holding their checksums), so a reader
can tell a mismatched pair instead of trusting it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp-"
STALE_AFTER_S = 3600.0  # no write of one file takes an hour: an older temporary sibling is a dead writer's


@contextlib.contextmanager
def replacing(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller to write; on a clean exit make it
    durable and move it over ``path``; on an exception remove it and leave ``path`` as it was.
    ``mode``: permissions of the result (None: what the writer created, i.e. the umask's)."""
    path = Path(path)
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.stem}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        fsync_file(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> Path:
    """``path`` holding ``data``, whole or not at all (see ``replacing``)."""
    with replacing(path, mode) as tmp, open(tmp, "xb") as fh:
        fh.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, mode: int | None = None) -> Path:
    return write_bytes(path, text.encode(), mode)


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make the names in ``path`` durable. Some filesystems refuse to open or fsync a directory;
    nothing more can be done there, and the data itself is already on disk."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(path: str | Path, older_than_s: float = STALE_AFTER_S) -> None:
    """Remove the temporary siblings of ``path`` that interrupted writes left behind."""
    path = Path(path)
    cutoff = time.time() - older_than_s
    for tmp in path.parent.glob(f".{glob.escape(path.stem)}{TMP_MARK}*{glob.escape(path.suffix)}"):
        with contextlib.suppress(OSError):  # gone already, or not ours to remove
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
