"""Files written so that a crash leaves the old file or the new one, never half of one: the
writer fills a temporary name in the same folder (same filesystem) and renames it."""

import contextlib
import os
import socket

__all__ = ["temporary_path", "written_atomically"]


def temporary_path(path):
    """Where a writer of ``path`` writes before the atomic rename: ``.<name>.tmp-<host>-<pid>``
    in the same folder (the same filesystem, so ``os.replace`` is atomic)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{name}.tmp-{socket.gethostname()}-{os.getpid()}")


@contextlib.contextmanager
def written_atomically(path):
    """``with written_atomically(path) as tmp:`` write ``tmp``; on success it replaces
    ``path`` in one rename, on any error it is removed and ``path`` is left as it was."""
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, os.fspath(path))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
