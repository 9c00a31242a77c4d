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
"""

import hashlib
import json
import os
import re

import h5py
import numpy as np

FORMAT = "wrn3d_tl-checkpoint"
VERSION = 1
MAGIC = b"wrn3d_tl-checkpoint sha256="
_USERBLOCK = 512
_STALE_TMP = re.compile(r"^\..+\.tmp-(\d+)$")
_GROUPS = ("weights", "optimizer", "state")

__all__ = ["CheckpointError", "write_checkpoint", "read_checkpoint", "checkpoint_contents"]


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


def _remove_stale_temporaries(folder):
    """Delete temporary files left by writers that were killed (their process is gone)."""
    for name in os.listdir(folder):
        m = _STALE_TMP.match(name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass
        except OSError:
            pass


def write_checkpoint(path, *, config, trainer, step, normalization, weights, optimizer, state=None):
    """Write a checkpoint atomically; returns the final path.

    ``weights``/``optimizer``/``state``: dicts of name -> numpy array. The data go to a
    temporary file in the same folder, which is flushed, fsynced and then renamed over
    ``path`` (``os.replace``), so a crash at any moment leaves the previous file intact.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    meta = {"config": config, "trainer": trainer, "step": int(step), "normalization": normalization}
    arrays = {f"{g}/{k}": np.asarray(v) for g, d in zip(_GROUPS, (weights, optimizer, state or {}))
              for k, v in d.items()}
    _remove_stale_temporaries(folder)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
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
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
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
