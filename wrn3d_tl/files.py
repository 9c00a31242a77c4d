"""Files written so that a crash leaves the old file or the new one, never half of one: the
writer fills a temporary name in the same folder (same filesystem) and renames it. Every
file the library writes goes through ``written_atomically``."""

import contextlib
import hashlib
import os
import socket

__all__ = ["temporary_path", "written_atomically", "save_figure", "fingerprint"]


def temporary_path(path):
    """Where a writer of ``path`` writes before the atomic rename: ``.<name>.tmp-<host>-<pid>``
    in the same folder (the same filesystem, so ``os.replace`` is atomic)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _fsync(path, flags=os.O_RDONLY):
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def written_atomically(path, *, fsync=True, makedirs=False):
    """``with written_atomically(path) as tmp:`` write ``tmp``; on success it replaces
    ``path`` in one rename, on any error it is removed and ``path`` is left as it was.

    ``fsync``: the data reach the disk before the rename, and the rename itself after it
    (the folder is synced), so even a power cut leaves one whole file. ``makedirs``: create
    the folder first. Writers that pick the format from the file's extension (matplotlib's
    ``savefig``) must name it, since ``tmp`` ends in ``-<pid>``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if makedirs:
        os.makedirs(folder, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if fsync:
        try:
            _fsync(folder)
        except OSError:  # some filesystems cannot sync a folder; the data are on disk
            pass


def save_figure(fig, path, **savefig_kwargs):
    """``fig.savefig(path)`` (a matplotlib Figure) through ``written_atomically``, its folder
    created; the format is the path's extension (``png`` without one). Returns ``path``."""
    path = os.fspath(path)
    with written_atomically(path, makedirs=True) as tmp:
        fig.savefig(tmp, format=os.path.splitext(path)[1][1:].lower() or "png", **savefig_kwargs)
    return path


def fingerprint(path):
    """What a run read from ``path``, to tell later whether the data changed, as a JSON-able
    dict ``{"path", "files", "bytes", "sha256"}``: for a file, the sha256 of its contents; for
    a folder (a table of class sub-folders), the sha256 of its listing: every file's relative
    name and size, in sorted order (the scans are not read)."""
    path = os.fspath(path)
    digest = hashlib.sha256()
    if os.path.isfile(path):
        files, size = 1, os.path.getsize(path)
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    elif os.path.isdir(path):
        listing = sorted((os.path.relpath(os.path.join(d, f), path), os.path.getsize(os.path.join(d, f)))
                         for d, _, names in os.walk(path) for f in names)
        for name, n in listing:
            digest.update(f"{name}\0{n}\n".encode())
        files, size = len(listing), sum(n for _, n in listing)
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    return {"path": os.path.abspath(path), "files": files, "bytes": size, "sha256": digest.hexdigest()}
