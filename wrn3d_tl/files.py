"""Files written so that a crash leaves the old file or the new one, never half of one: the
writer fills a temporary name in the same folder (same filesystem) and renames it. Every
file the library writes goes through ``written_atomically``."""

import contextlib
import os
import socket

__all__ = ["temporary_path", "written_atomically", "save_figure"]


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
