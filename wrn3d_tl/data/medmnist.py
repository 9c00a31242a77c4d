"""MedMNIST-3D (Yang et al., "MedMNIST v2", Scientific Data 10, 41, 2023) from its official
``.npz`` files: ``{flag}.npz`` (28^3) or ``{flag}_64.npz`` (64^3, MedMNIST+), each holding
``train_images`` ``(N, S, S, S)`` uint8 and ``train_labels`` ``(N, 1)``, and the same for
``val`` and ``test``.
"""

from __future__ import annotations

import os
import urllib.request

import numpy as np

from wrn3d_tl.files import written_atomically

from .cifar import DATA_DIR_ENV

__all__ = ["MEDMNIST3D", "MEDMNIST_URL", "MEDMNIST_SIZES", "MEDMNIST_RELEASES", "load_medmnist3d",
           "medmnist_file_name", "medmnist_release"]

MEDMNIST_SIZES = (28, 64)
# The current release (MedMNIST v3 / MedMNIST+, Zenodo record 10519652); only used with download=True.
MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{name}?download=1"
SPLITS = ("train", "val", "test")


# The releases whose split sizes differ: the medmnist package v2.2.4 and later (v3.0.2's INFO,
# the files the download URL serves) dropped one organmnist3d train and one vesselmnist3d val volume.
MEDMNIST_RELEASES = ("v2.2.4+ (current, v3.0.2)", "before v2.2.4")


def _entry(task, labels, train, val, test, before_2_2_4=None):
    current = {"train": train, "val": val, "test": test}
    return {"task": task, "num_classes": len(labels), "labels": tuple(labels), "n_samples": current,
            "releases": dict(zip(MEDMNIST_RELEASES, (current, {**current, **(before_2_2_4 or {})})))}


# Task, class names (index order) and split sizes, as the MedMNIST package's INFO (v3.0.2) gives them.
MEDMNIST3D = {
    "organmnist3d": _entry("multi-class", ("liver", "kidney-right", "kidney-left", "femur-right", "femur-left",
                                           "bladder", "heart", "lung-right", "lung-left", "spleen", "pancreas"),
                           971, 161, 610, before_2_2_4={"train": 972}),
    "nodulemnist3d": _entry("binary-class", ("benign", "malignant"), 1158, 165, 310),
    "adrenalmnist3d": _entry("binary-class", ("normal", "hyperplasia"), 1188, 98, 298),
    "fracturemnist3d": _entry("multi-class", ("buckle rib fracture", "nondisplaced rib fracture",
                                              "displaced rib fracture"), 1027, 103, 240),
    "vesselmnist3d": _entry("binary-class", ("vessel", "aneurysm"), 1335, 191, 382, before_2_2_4={"val": 192}),
    "synapsemnist3d": _entry("binary-class", ("inhibitory synapse", "excitatory synapse"), 1230, 177, 352),
}


def medmnist_file_name(flag: str, size: int = 28) -> str:
    """The official file name: ``organmnist3d.npz`` (size 28) or ``organmnist3d_64.npz``."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def _default_dir():
    return os.path.join(os.path.expanduser("~"), ".medmnist")


def _candidates(data_dir):
    dirs = [] if data_dir is None else [os.fspath(data_dir)]
    if os.environ.get(DATA_DIR_ENV):
        dirs.append(os.environ[DATA_DIR_ENV])
    dirs.append(_default_dir())
    return list(dict.fromkeys(dirs))


def medmnist_release(flag, sizes):
    """The release (``MEDMNIST_RELEASES``) whose split sizes ``{"train": n, "val": n, "test":
    n}`` are, or None (newest first when several releases agree)."""
    return next((name for name, n in MEDMNIST3D[flag]["releases"].items() if n == dict(sizes)), None)


def _check_file(path, flag, size, check_sizes):
    spec = MEDMNIST3D[flag]
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:  # not a zip, truncated, ...
        raise ValueError(f"MedMNIST file {path!r} is not a readable .npz archive: {' '.join(str(e).split())}") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):      # a lone .npy array under the .npz name
        raise ValueError(f"MedMNIST file {path!r} holds a single array, not an .npz archive of splits")
    out = {}
    with npz:
        want = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
        missing = [k for k in want if k not in npz.files]
        if missing:
            raise ValueError(f"MedMNIST file {path!r} lacks the arrays {missing} (it holds {sorted(npz.files)})")
        for split in SPLITS:
            try:
                x, y = npz[f"{split}_images"], npz[f"{split}_labels"]
            except Exception as e:  # an object array (needs pickle) or a damaged member
                raise ValueError(f"MedMNIST file {path!r}: cannot read the {split} arrays: "
                                 f"{' '.join(str(e).split())}") from e
            what = f"MedMNIST file {path!r} {split}_images"
            if x.dtype != np.uint8:
                raise ValueError(f"{what} has dtype {x.dtype}; the official files hold uint8")
            if x.ndim == 5 and x.shape[-1] == 1:
                x = x[..., 0]
            if x.ndim != 4 or x.shape[1:] != (size,) * 3:
                raise ValueError(f"{what} has shape {x.shape}; expected (N, {size}, {size}, {size}) for size={size}")
            what = f"MedMNIST file {path!r} {split}_labels"
            if y.dtype.kind not in "iu":
                raise ValueError(f"{what} has dtype {y.dtype}; expected integers")
            if y.shape not in ((len(x), 1), (len(x),)):
                raise ValueError(f"{what} has shape {y.shape}; expected ({len(x)}, 1) to match the images")
            y = y.reshape(-1).astype(np.int64)
            if len(y) and (y.min() < 0 or y.max() >= spec["num_classes"]):
                raise ValueError(f"{what} holds labels from {y.min()} to {y.max()}; {flag} has "
                                 f"{spec['num_classes']} classes")
            out[split] = (x[..., None], y)
    sizes = {split: len(out[split][0]) for split in SPLITS}
    if check_sizes and medmnist_release(flag, sizes) is None:
        official = "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in n.items())
                             for name, n in spec["releases"].items())
        raise ValueError(f"MedMNIST file {path!r} holds " + ", ".join(f"{k} {v}" for k, v in sizes.items())
                         + f" volumes, which is no official {flag} release ({official}); pass check_sizes=False "
                         "for a subset you made yourself")
    return out


def _download(flag, size, folder):
    name = medmnist_file_name(flag, size)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    url = MEDMNIST_URL.format(name=name)
    with written_atomically(path) as tmp, urllib.request.urlopen(url, timeout=60) as response, \
            open(tmp, "wb") as fh:
        while chunk := response.read(1 << 20):
            fh.write(chunk)
    return path


def load_medmnist3d(flag: str, *, data_dir=None, size: int = 28, download: bool = False,
                    check_sizes: bool = True) -> dict:
    """Load one MedMNIST-3D dataset from its official ``.npz`` file.

    Search order (the first existing file wins): ``data_dir``, ``$WRN3D_DATA_DIR``,
    ``~/.medmnist`` (where the ``medmnist`` package keeps it), each for
    ``medmnist_file_name(flag, size)``. Nothing is downloaded unless ``download=True``
    (then the file is fetched from Zenodo into the first of those folders).

    Args:
      flag: a key of ``MEDMNIST3D`` (``"organmnist3d"``, ``"nodulemnist3d"``, ...).
      size: 28 or 64.
      check_sizes: refuse a file whose split sizes are those of no official release
        (``MEDMNIST_RELEASES``: the current one and the one before v2.2.4 are accepted;
        ``medmnist_release`` names which a file matches).

    Returns:
      ``{"train": (x, y), "val": (x, y), "test": (x, y)}``: ``x`` uint8 ``(N, S, S, S, 1)``
      (NDHWC, one channel), ``y`` int64 ``(N,)``.

    Raises:
      ValueError: unknown ``flag``/``size``, or a file whose arrays, dtypes, shapes, labels or
        split sizes disagree with the release (the message names the file and what differs).
        Files are read with ``allow_pickle=False``.
      FileNotFoundError: no file found; the message lists the paths tried and where to get it.
    """
    if flag not in MEDMNIST3D:
        raise ValueError(f"flag must be one of {sorted(MEDMNIST3D)}, got {flag!r}")
    if size not in MEDMNIST_SIZES or isinstance(size, bool):
        raise ValueError(f"size must be one of {MEDMNIST_SIZES}, got {size!r}")
    name = medmnist_file_name(flag, size)
    tried = []
    for folder in _candidates(data_dir):
        path = os.path.join(folder, name)
        tried.append(path)
        if os.path.isfile(path):
            return _check_file(path, flag, size, check_sizes)
    if download:
        return _check_file(_download(flag, size, _candidates(data_dir)[0]), flag, size, check_sizes)
    listing = "\n".join(f"  - {p}" for p in tried)
    raise FileNotFoundError(
        f"MedMNIST file {name} not found. Paths tried, in order:\n{listing}\n"
        f"Get it from {MEDMNIST_URL.format(name=name)} (or with the medmnist package) and put it in one of "
        f"those folders, set ${DATA_DIR_ENV} (or pass data_dir=), or pass download=True.")
