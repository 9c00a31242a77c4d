"""CIFAR-10/100 loading (official python-pickle format) and a synthetic stand-in.

Images are returned as uint8 ``NHWC`` arrays (N x 32 x 32 x 3) and labels as
int64 arrays of shape ``(N,)``.
"""

from __future__ import annotations

import os
import pickle
import posixpath
import tarfile
import zlib

import numpy as np

from wrn3d_tl.validate import check_int


__all__ = ["load_cifar", "synthetic_cifar", "CIFAR_SPECS", "DATA_DIR_ENV"]

DATA_DIR_ENV = "WRN3D_DATA_DIR"

CIFAR_SPECS = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "labels": {"fine": (b"labels", 10)},
        # Keras 3 caches as <fname>/..., Keras 2 as <folder>.tar.gz
        "keras_folders": ["cifar-10-batches-py-target"],
        "keras_archives": ["cifar-10-batches-py-target_archive",
                           "cifar-10-batches-py.tar.gz"],
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "labels": {"fine": (b"fine_labels", 100),
                   "coarse": (b"coarse_labels", 20)},
        "keras_folders": ["cifar-100-python-target"],
        "keras_archives": ["cifar-100-python-target_archive",
                           "cifar-100-python.tar.gz"],
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    },
}

_PIXELS = 32 * 32 * 3


# --------------------------------------------------------------------------
# parsing one pickled batch
# --------------------------------------------------------------------------
def _get(d: dict, key: bytes):
    """Look a key up as bytes (python-2 pickles) or str (python-3 pickles)."""
    if key in d:
        return d[key]
    return d.get(key.decode())


def _parse_batch(fileobj, where: str, label_key: bytes, num_classes: int):
    """Unpickle one CIFAR batch -> (uint8 N x 32 x 32 x 3, int64 (N,))."""
    try:
        # NOTE: pickle can execute code -- only load CIFAR files you trust.
        batch = pickle.load(fileobj, encoding="bytes")
    except Exception as err:  # any unpickling failure means a bad file
        raise ValueError(
            f"{where}: cannot read CIFAR batch ({type(err).__name__}: {err}); "
            "the file is truncated or corrupt -- delete it and fetch it again"
        ) from err
    if not isinstance(batch, dict):
        raise ValueError(f"{where}: expected a pickled dict, got "
                         f"{type(batch).__name__}")
    data, labels = _get(batch, b"data"), _get(batch, label_key)
    if data is None or labels is None:
        raise ValueError(
            f"{where}: expected keys {b'data'!r} and {label_key!r}, found "
            f"{sorted(map(repr, batch))}"
        )
    data, labels = np.asarray(data), np.asarray(labels)
    if data.ndim != 2 or data.shape[1] != _PIXELS:
        raise ValueError(f"{where}: 'data' must be N x {_PIXELS} (3 x 32 x 32 "
                         f"channel-major), got shape {data.shape}")
    if data.dtype != np.uint8:
        if data.dtype.kind not in "iu" or (
                data.size and (data.min() < 0 or data.max() > 255)):
            raise ValueError(f"{where}: 'data' must be uint8 pixels 0..255, "
                             f"got dtype {data.dtype}")
        data = data.astype(np.uint8)
    if labels.shape != (data.shape[0],) or (
            labels.size and labels.dtype.kind not in "iu"):
        raise ValueError(
            f"{where}: {label_key.decode()!r} must be {data.shape[0]} integers "
            f"(one per image), got {labels.dtype} array of shape {labels.shape}"
        )
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{where}: {label_key.decode()!r} must be in 0..{num_classes - 1}, "
            f"got values {labels.min()}..{labels.max()}"
        )
    # channel-major rows (1024 R, 1024 G, 1024 B; each row-major 32x32) -> HWC
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _concat(parts):
    images, labels = zip(*parts)
    return np.concatenate(images), np.concatenate(labels)


def _load_folder(folder: str, spec: dict, label_key: bytes, num_classes: int):
    out = []
    for names in (spec["train"], spec["test"]):
        parts = []
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise ValueError(
                    f"CIFAR folder {folder!r} is incomplete: missing {path!r} "
                    f"(expected files {spec['train'] + spec['test']})"
                )
            with open(path, "rb") as f:
                parts.append(_parse_batch(f, path, label_key, num_classes))
        out.append(_concat(parts))
    return tuple(out)


def _load_archive(path: str, spec: dict, label_key: bytes, num_classes: int):
    names = spec["train"] + spec["test"]
    found = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:  # one sequential pass, nothing written to disk
                parts = posixpath.normpath(member.name).split("/")
                if (member.isfile() and len(parts) >= 2
                        and parts[-2] == spec["folder"] and parts[-1] in names):
                    where = f"{path} (member {member.name})"
                    found[parts[-1]] = _parse_batch(
                        tar.extractfile(member), where, label_key, num_classes)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ValueError(
            f"{path}: cannot read CIFAR archive ({type(err).__name__}: {err}); "
            "the file is truncated or corrupt -- delete it and fetch it again"
        ) from err
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(
            f"{path}: not a complete {spec['archive']} archive, missing "
            f"{[spec['folder'] + '/' + n for n in missing]}"
        )
    return (_concat([found[n] for n in spec["train"]]),
            _concat([found[n] for n in spec["test"]]))


# --------------------------------------------------------------------------
# search + download
# --------------------------------------------------------------------------
def _keras_cache_dir() -> str:
    home = os.environ.get("KERAS_HOME") or os.path.join(
        os.path.expanduser("~"), ".keras")
    return os.path.join(home, "datasets")


def _candidates(data_dir, spec):
    """Yield (kind, path) in search order; kind is 'folder' or 'archive'."""
    locations = []
    if data_dir is not None:
        locations.append((os.fspath(data_dir), False))
    if os.environ.get(DATA_DIR_ENV):
        locations.append((os.environ[DATA_DIR_ENV], False))
    locations.append((_keras_cache_dir(), True))
    for loc, is_keras in locations:
        loc = os.path.expanduser(loc)
        if os.path.isfile(loc):                       # the archive itself
            yield "archive", loc
            continue
        if (os.path.basename(os.path.normpath(loc)) == spec["folder"]
                or os.path.isfile(os.path.join(loc, spec["train"][0]))):
            yield "folder", loc                       # the folder itself
        yield "folder", os.path.join(loc, spec["folder"])
        yield "archive", os.path.join(loc, spec["archive"])
        if is_keras:
            for sub in spec["keras_folders"]:
                yield "folder", os.path.join(loc, sub, spec["folder"])
            for name in spec["keras_archives"]:
                yield "archive", os.path.join(loc, name)


def _keras_download(name: str, label_mode: str):
    """Download through Keras (caches under ~/.keras/datasets)."""
    import tensorflow as tf  # imported lazily: only needed for downloads

    if name == "cifar10":
        return tf.keras.datasets.cifar10.load_data()
    return tf.keras.datasets.cifar100.load_data(label_mode=label_mode)


def _from_keras(split, num_classes, where):
    x, y = np.asarray(split[0]), np.asarray(split[1]).reshape(-1)
    if x.ndim == 4 and x.shape[1:] == (3, 32, 32):   # channels_first Keras
        x = x.transpose(0, 2, 3, 1)
    if x.shape[1:] != (32, 32, 3) or len(x) != len(y):
        raise ValueError(f"{where}: unexpected shapes {x.shape}, {y.shape}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{where}: labels outside 0..{num_classes - 1}")
    return np.ascontiguousarray(x, dtype=np.uint8), y


def load_cifar(name: str = "cifar10", data_dir=None, download: bool = False,
               label_mode: str = "fine"):
    """Load CIFAR-10 or CIFAR-100 from the official python-pickle files.

    Search order (the first hit wins): ``data_dir``, ``$WRN3D_DATA_DIR``, the
    Keras cache ``$KERAS_HOME/datasets`` (default ``~/.keras/datasets``). Each
    location may contain the extracted folder (``cifar-10-batches-py/`` or
    ``cifar-100-python/``) or the original archive (``cifar-10-python.tar.gz``
    / ``cifar-100-python.tar.gz``, read in place with ``tarfile``, nothing is
    extracted), or may itself BE that folder or archive. The Keras cache is
    also searched in the layouts Keras 2/3 use after ``load_data()``.

    Args:
      name: ``"cifar10"`` or ``"cifar100"``.
      data_dir: optional directory (str or PathLike) searched first.
      download: if nothing is found, download with
        ``keras.datasets.<name>.load_data()`` (cached in the Keras cache, so
        the next call finds it). Never downloads when False.
      label_mode: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses)
        for CIFAR-100; must be ``"fine"`` for CIFAR-10.

    Returns:
      ``(x_train, y_train), (x_test, y_test)``: ``x`` uint8 of shape
      ``(N, 32, 32, 3)`` (NHWC, RGB), ``y`` int64 of shape ``(N,)``.
      CIFAR-10: 50000/10000 images, labels 0..9; CIFAR-100: 50000/10000,
      labels 0..99 (fine) or 0..19 (coarse).

    Raises:
      ValueError: unknown ``name``/``label_mode``, or a found file that is
        truncated, corrupt, of the wrong size or has out-of-range labels (the
        message names the file).
      FileNotFoundError: nothing found (and ``download=False``); the message
        lists every path tried and how to get the data.

    Security: the batches are pickles; only load files from a trusted source.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in CIFAR_SPECS:
        raise ValueError(f"name must be one of {sorted(CIFAR_SPECS)}, got "
                         f"{name!r}")
    spec = CIFAR_SPECS[key]
    if label_mode not in spec["labels"]:
        raise ValueError(
            f"label_mode must be one of {sorted(spec['labels'])} for {key}, "
            f"got {label_mode!r}"
        )
    label_key, num_classes = spec["labels"][label_mode]

    tried = []
    for kind, path in _candidates(data_dir, spec):
        if path in (p for _, p in tried):
            continue
        tried.append((kind, path))
        if kind == "folder" and os.path.isdir(path):
            return _load_folder(path, spec, label_key, num_classes)
        if kind == "archive" and os.path.isfile(path):
            return _load_archive(path, spec, label_key, num_classes)

    if download:
        train, test = _keras_download(key, label_mode)
        where = f"keras.datasets.{key}.load_data()"
        return (_from_keras(train, num_classes, where),
                _from_keras(test, num_classes, where))

    first_dir = os.fspath(data_dir) if data_dir is not None else \
        os.environ.get(DATA_DIR_ENV) or _keras_cache_dir()
    listing = "\n".join(f"  - {path}  ({kind})" for kind, path in tried)
    raise FileNotFoundError(
        f"{key} not found. Paths tried, in order:\n{listing}\n"
        "To get the data, either:\n"
        f"  * call load_cifar({key!r}, download=True) (downloads via Keras), or\n"
        f"  * download {spec['url']} and put {spec['archive']} (or its "
        f"extracted folder {spec['folder']}/) in {first_dir}, or\n"
        f"  * set ${DATA_DIR_ENV} (or pass data_dir=) to the directory that "
        "holds it."
    )


# --------------------------------------------------------------------------
# synthetic, learnable CIFAR-shaped data
# --------------------------------------------------------------------------
def _upsample_matrix(coarse: int, fine: int) -> np.ndarray:
    """(fine, coarse) linear-interpolation matrix (corners aligned)."""
    pos = np.linspace(0.0, coarse - 1.0, fine)
    lo = np.minimum(np.floor(pos).astype(int), coarse - 2)
    frac = pos - lo
    m = np.zeros((fine, coarse))
    m[np.arange(fine), lo] = 1.0 - frac
    m[np.arange(fine), lo + 1] = frac
    return m


def synthetic_cifar(n_train: int, n_test: int, num_classes: int = 10,
                    seed: int = 0, *, noise: float = 20.0, max_shift: int = 2):
    """A learnable synthetic dataset with CIFAR shapes and dtypes.

    Each class has a fixed random template: a smooth (bilinearly upsampled
    4x4) colour pattern plus a class colour offset around grey 128. A sample
    is its class template, randomly translated by up to ``max_shift`` pixels
    in each direction, plus i.i.d. Gaussian noise (std ``noise`` in 0..255
    units), rounded and clipped to uint8. Classes are balanced (each label
    appears ``n // num_classes`` or one more times, in random order). A tiny
    CNN (two strided 3x3 convs + global pooling, Adam) reaches >90% train
    accuracy within ~100 steps of batch 32; the class means alone classify
    the test split almost perfectly.

    Args:
      n_train, n_test: number of samples per split (non-negative ints).
      num_classes: number of classes K (positive int).
      seed: non-negative int; the result is fully determined by
        ``(n_train, n_test, num_classes, seed, noise, max_shift)``.
      noise, max_shift: difficulty knobs.

    Returns:
      ``(x_train, y_train), (x_test, y_test)`` like :func:`load_cifar`: uint8
      ``(N, 32, 32, 3)`` NHWC images and int64 ``(N,)`` labels in 0..K-1.
      Train and test come from the same distribution (same templates).
    """
    n_train = check_int(n_train, "n_train", 0)
    n_test = check_int(n_test, "n_test", 0)
    num_classes = check_int(num_classes, "num_classes")
    max_shift = check_int(max_shift, "max_shift", 0)
    rng = np.random.default_rng(check_int(seed, "seed", 0))

    size = 32 + 2 * max_shift
    up = _upsample_matrix(4, size)
    coarse = rng.normal(size=(num_classes, 4, 4, 3))
    pattern = np.einsum("yi,kijc,xj->kyxc", up, coarse, up)
    colour = rng.uniform(-1.0, 1.0, size=(num_classes, 1, 1, 3))
    templates = (128.0 + 60.0 * colour + 40.0 * pattern).astype(np.float32)
    offsets = np.arange(32)

    def draw(n):
        labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
        shifts = rng.integers(0, 2 * max_shift + 1, size=(n, 2))
        images = np.empty((n, 32, 32, 3), np.uint8)
        for start in range(0, n, 2048):  # bounded float32 working memory
            sl = slice(start, start + 2048)
            rows = shifts[sl, 0, None] + offsets            # (b, 32)
            cols = shifts[sl, 1, None] + offsets            # (b, 32)
            crop = templates[labels[sl, None, None], rows[:, :, None],
                             cols[:, None, :]]              # (b, 32, 32, 3)
            crop += noise * rng.standard_normal(crop.shape, dtype=np.float32)
            images[sl] = np.clip(np.rint(crop), 0, 255).astype(np.uint8)
        return images, labels

    return draw(n_train), draw(n_test)
