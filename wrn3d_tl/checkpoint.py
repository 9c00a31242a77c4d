"""The checkpoint file: one HDF5 file (h5py) per save, written atomically, checksummed.

Layout::

    /                   attrs: format="wrn3d_tl-checkpoint", version, config (JSON of
                        WRNConfig), trainer (JSON of hyperparameters), step (int),
                        normalization (JSON or ""), checksum (sha256 hex of every array)
    /weights/<name>     every model variable by name (e.g. "group2/block1/conv1/kernel")
    /optimizer/<name>   the optimizer's slot variable for that weight (momentum buffer)
    /state/<name>       other trainer state (e.g. the fp16 loss scale)

The first 512 bytes are an HDF5 user block holding ``MAGIC`` and the SHA-256 of every
byte after the block, zero-padded: a flipped byte anywhere in the file — even one HDF5
never reads — is refused. The ``checksum`` attribute covers the contents as read back.
TensorLayer's own savers fail on h5py 3 / numpy 2, hence this format.

A folder of periodic checkpoints (``ckpt-XXXXXXXX.h5``, the step in 8 digits) is owned by
a ``CheckpointManager``: naming, keep-N pruning, the newest checkpoint that verifies.
A file is written under a temporary name ``.<name>.tmp-<host>-<pid>`` first; the name
says which writer it belongs to, so clean-up on a shared filesystem only ever removes
temporaries of this host whose process is gone.
"""

import hashlib
import json
import os
import re
import socket
import sys

import h5py
import numpy as np

from wrn3d_tl.files import temporary_path, written_atomically  # noqa: F401  (temporary_path: also this module's name for it)
from wrn3d_tl.validate import check_int

FORMAT = "wrn3d_tl-checkpoint"
VERSION = 1
MAGIC = b"wrn3d_tl-checkpoint sha256="
_USERBLOCK = 512
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)$")
_PERIODIC = re.compile(r"^ckpt-(\d{8})\.h5$")
_GROUPS = ("weights", "optimizer", "state")

__all__ = ["CheckpointError", "CheckpointManager", "write_checkpoint", "read_checkpoint", "checkpoint_contents",
           "temporary_path"]


class CheckpointError(ValueError):
    """A file that is not a readable, intact, compatible wrn3d_tl checkpoint."""


def _checksum(meta, arrays):
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True).encode())
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(key.encode())
        h.update(str(a.dtype).encode())
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _file_digest(fh):
    fh.seek(_USERBLOCK)
    h = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest().encode()


def remove_stale_temporaries(folder):
    """Delete temporaries left in ``folder`` by killed writers of THIS host (their process
    is gone); returns the removed names. Another host's temporary is never touched: its
    writer may be alive and mid-write on a shared filesystem."""
    host, removed = socket.gethostname(), []
    for name in os.listdir(folder):
        m = _TEMP.match(name)
        if not m or m["host"] != host or int(m["pid"]) == os.getpid():
            continue
        try:
            os.kill(int(m["pid"]), 0)
        except ProcessLookupError:
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
        except OSError:  # alive, owned by someone else
            pass
    return removed


def write_checkpoint(path, *, config, trainer, step, normalization, weights, optimizer, state=None):
    """Write a checkpoint atomically; returns the final path.

    ``weights``/``optimizer``/``state``: dicts of name -> numpy array. The data go to a
    temporary file in the same folder, which is flushed, fsynced and then renamed over
    ``path`` (``os.replace``), so a crash at any moment leaves the previous file intact.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)   # before the sweep of stale temporaries below
    meta = {"config": config, "trainer": trainer, "step": int(step), "normalization": normalization}
    arrays = {f"{g}/{k}": np.asarray(v) for g, d in zip(_GROUPS, (weights, optimizer, state or {}))
              for k, v in d.items()}
    remove_stale_temporaries(folder)
    with written_atomically(path) as tmp:
        with h5py.File(tmp, "w", userblock_size=_USERBLOCK) as f:
            f.attrs["format"] = FORMAT
            f.attrs["version"] = VERSION
            f.attrs["config"] = json.dumps(config)
            f.attrs["trainer"] = json.dumps(trainer)
            f.attrs["step"] = int(step)
            f.attrs["normalization"] = json.dumps(normalization)
            for g in _GROUPS:
                f.create_group(g)
            for key, value in arrays.items():
                f.create_dataset(key, data=value)
            f.attrs["checksum"] = _checksum(meta, arrays)
        with open(tmp, "rb+") as fh:
            header = MAGIC + _file_digest(fh)
            fh.seek(0)
            fh.write(header.ljust(_USERBLOCK, b"\0"))
    return path


def read_checkpoint(path):
    """Read and verify a checkpoint; returns a dict with config, trainer, step,
    normalization, weights, optimizer, state (arrays as numpy).

    Raises FileNotFoundError when absent and CheckpointError (a ValueError) naming the
    file when it is not HDF5, not a wrn3d_tl checkpoint, truncated or corrupted.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    with open(path, "rb") as fh:
        header = fh.read(_USERBLOCK)
        signed = header.startswith(MAGIC)
        if signed:
            digest = header[len(MAGIC):len(MAGIC) + 64]
            if header[len(MAGIC) + 64:].strip(b"\0") or digest != _file_digest(fh):
                raise CheckpointError(f"checkpoint {path!r} fails its file checksum: it was truncated, altered "
                                      "or damaged on disk")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CheckpointError(f"checkpoint {path!r} is not a readable HDF5 file (truncated or corrupt?): {e}") from e
    try:
        with f:
            if f.attrs.get("format") != FORMAT:
                raise CheckpointError(f"{path!r} is an HDF5 file but not a wrn3d_tl checkpoint "
                                      f"(no format={FORMAT!r} attribute)")
            if not signed:  # every checkpoint is written with the header: it was damaged
                raise CheckpointError(f"checkpoint {path!r} fails its file checksum: its header is damaged")
            version = int(f.attrs.get("version", -1))
            if version != VERSION:
                raise CheckpointError(f"checkpoint {path!r} has format version {version}; this library reads {VERSION}")
            meta = {
                "config": json.loads(f.attrs["config"]),
                "trainer": json.loads(f.attrs["trainer"]),
                "step": int(f.attrs["step"]),
                "normalization": json.loads(f.attrs["normalization"]),
            }
            arrays = {}
            for g in _GROUPS:
                f[g].visititems(lambda name, obj, g=g: arrays.__setitem__(f"{g}/{name}", obj[()])
                                if isinstance(obj, h5py.Dataset) else None)
            stored = f.attrs.get("checksum")
    except CheckpointError:
        raise
    except Exception as e:  # h5py raises OSError/KeyError/RuntimeError on damaged files
        raise CheckpointError(f"checkpoint {path!r} is damaged and cannot be read: {type(e).__name__}: {e}") from e
    if stored != _checksum(meta, arrays):
        raise CheckpointError(f"checkpoint {path!r} fails its checksum: its contents were altered or damaged")
    out = dict(meta)
    for g in _GROUPS:
        prefix = g + "/"
        out[g] = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    return out


def checkpoint_contents(path):
    """A short dict describing a checkpoint (config, step, trainer settings), verified."""
    ck = read_checkpoint(path)
    return {k: ck[k] for k in ("config", "trainer", "step", "normalization")}


class CheckpointManager:
    """Owns a folder of periodic checkpoints ``ckpt-XXXXXXXX.h5`` (in the spirit of
    ``tf.train.CheckpointManager``): their names, keep-N pruning, the newest one, the
    newest one that verifies, and clean-up of temporaries left by killed writers.

    Args:
        directory: the folder (created on the first ``path_for``).
        keep: how many periodic checkpoints ``prune`` keeps (newest first); None keeps all.
        report: called with one line per damaged checkpoint that ``newest_verified``
            skips (default: print to stderr).
    """

    def __init__(self, directory, keep=3, report=None):
        keep = check_int(keep, "keep", allow_none=True)
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep = keep
        self.report = report or (lambda line: print(line, file=sys.stderr, flush=True))

    @classmethod
    def beside(cls, path, **kwargs):
        """The manager of the folder holding ``path`` (a run's ``--checkpoint`` file): its
        periodic checkpoints are written next to it."""
        return cls(os.path.dirname(os.path.abspath(os.fspath(path))), **kwargs)

    def path_for(self, step):
        """The file name of the periodic checkpoint at ``step``."""
        return os.path.join(self.directory, f"ckpt-{int(step):08d}.h5")

    def checkpoints(self):
        """``(step, path)`` of every periodic checkpoint, oldest first (by the step in the
        name; empty when the folder is absent). Temporaries are never listed."""
        if not os.path.isdir(self.directory):
            return []
        return sorted((int(m.group(1)), os.path.join(self.directory, name)) for name in os.listdir(self.directory)
                      if (m := _PERIODIC.match(name)))

    def latest(self):
        """Path of the newest periodic checkpoint by name, or None (not verified)."""
        found = self.checkpoints()
        return found[-1][1] if found else None

    def prune(self):
        """Delete all but the newest ``keep`` periodic checkpoints; returns the deleted paths."""
        found = self.checkpoints()
        stale = [path for _, path in found[:-self.keep]] if self.keep else []
        for path in stale:
            os.remove(path)
        return stale

    def newest_verified(self, also=()):
        """The path of the checkpoint with the highest stored step among the periodic ones
        and the paths in ``also`` (e.g. a run's final checkpoint), that passes every check
        of ``read_checkpoint``; None when there is none. Damaged files are reported and
        skipped; missing ``also`` paths are ignored."""
        candidates = [(None, os.fspath(p)) for p in also] + self.checkpoints()[::-1]
        best = None
        for named_step, path in candidates:
            if not os.path.exists(path) or (best and named_step is not None and named_step <= best[0]):
                continue
            try:
                step = checkpoint_contents(path)["step"]
            except CheckpointError as e:
                self.report(f"skipping damaged checkpoint: {e}")
                continue
            if best is None or step > best[0]:
                best = (step, path)
        return best[1] if best else None

    def remove_stale_temporaries(self):
        """See the module function: this host's temporaries whose writer is gone."""
        return remove_stale_temporaries(self.directory) if os.path.isdir(self.directory) else []
