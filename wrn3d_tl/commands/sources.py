"""What ``wrn3d-train --data`` names, opened: a NIfTI table or class folders, an HDF5 file,
MedMNIST-3D's official splits, CIFAR or the synthetic set, each as per-split pipeline makers
(``Data``), every file checked before the first step.

Errors are ValueError/OSError naming the flag and the file; ``wrn3d-train`` prints them as
its one line.
"""

import csv
import dataclasses
import os

__all__ = ["ARRAY_SOURCES", "Data", "open_data"]

ARRAY_SOURCES = ("cifar10", "cifar100", "synthetic")


@dataclasses.dataclass
class Data:
    """What ``open_data`` found: per split a function ``(batch_size, training) -> Dataset``
    (``training`` adds shuffling, augmentation, repetition and full batches), and what the
    network and the run record need."""

    train: object
    val: object
    test: object
    n_train: int
    train_labels: object
    num_classes: int
    input_shape: tuple
    class_names: tuple = None
    normalization: object = None
    fingerprints: dict = dataclasses.field(default_factory=dict)
    description: str = ""


def open_data(args, run_dir):
    """The data ``args`` name, checked (every file's header or labels) before any training:
    a ``Data``. Raises ValueError/OSError naming the flag and the file."""
    return {"nifti": _nifti, "hdf5": _hdf5, "medmnist": _medmnist}.get(args.kind, _arrays)(args, run_dir)


def _augment(args, default):
    from wrn3d_tl.data import Augment3D

    spec = default if args.augment == "default" else args.augment
    return Augment3D(**spec) if isinstance(spec, dict) else spec


def _nifti(args, run_dir):
    from wrn3d_tl.data import nifti_dataset, nifti_info
    from wrn3d_tl.files import fingerprint

    given = {"data": args.data, "val": args.val, "test": args.test}
    infos, classes = {}, None
    for flag, table in given.items():   # every file's voxels once: all bad ones in one error, before any step
        if table:
            try:
                infos[flag] = nifti_info(table, classes=classes, check=True, orientation=args.orientation,
                                         spacing=args.spacing)
            except (OSError, ValueError) as e:
                raise ValueError(f"--{flag} {table}: {e}") from None
            classes = infos["data"].class_names     # val and test are numbered as the training table
    info, tables, labels = infos["data"], dict(given), infos["data"].labels
    if args.val_split:
        keep, held = _split(info.labels, args)
        folder = os.path.join(run_dir, "splits")
        os.makedirs(folder, exist_ok=True)
        tables["data"] = _write_table(os.path.join(folder, "train.csv"), info, keep)
        tables["val"] = _write_table(os.path.join(folder, "val.csv"), info, held)
        labels = info.labels[keep]
    shape = info.volume_shape if args.target_shape is None else tuple(args.target_shape) + (info.channels,)
    if shape is None:
        raise ValueError(f"--data {args.data}: the scans differ in shape; pass --target-shape D,H,W")
    augment = _augment(args, None)
    read = dict(target_shape=args.target_shape, intensity=args.intensity, classes=classes,
                num_classes=info.num_classes, orientation=args.orientation, spacing=args.spacing)

    def split(flag):
        if not tables[flag]:
            return None
        return lambda batch_size, training=False: nifti_dataset(
            tables[flag], batch_size=batch_size, training=training, repeat=training, drop_remainder=training,
            seed=args.seed, augment=augment if training else None, check=False, **read)

    prints = {f"--{flag}": {**fingerprint(given[flag]), "scans": i.n,   # the table's hash; the scans by size
                            "scan_bytes": sum(map(_bytes, i.paths))} for flag, i in infos.items()}
    return Data(train=split("data"), val=split("val"), test=split("test"), n_train=len(labels), train_labels=labels,
                num_classes=info.num_classes, input_shape=shape, class_names=classes, fingerprints=prints,
                description=f"{info.n} scans in {args.data}")


def _bytes(path):
    """The size of a scan: a file's, or the sum of the files its reader takes from a DICOM
    series folder (``dicom.series_files``)."""
    from wrn3d_tl.data.dicom import series_files

    return sum(map(os.path.getsize, series_files(path))) if os.path.isdir(path) else os.path.getsize(path)


def _split(labels, args):
    from wrn3d_tl.data import stratified_split

    try:
        return stratified_split(labels, args.val_split, seed=args.seed)
    except ValueError as e:
        raise ValueError(f"--val-split {args.val_split:g}: {e}") from None


def _write_table(path, info, rows):
    from wrn3d_tl.files import written_atomically

    names = info.class_names
    with written_atomically(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for i in rows:
            w.writerow([info.paths[i], names[info.labels[i]] if names else int(info.labels[i])])
    return path


def _hdf5(args, run_dir):
    import h5py
    import numpy as np

    from wrn3d_tl.data import compute_normalization, hdf5_dataset, hdf5_info
    from wrn3d_tl.files import fingerprint

    infos = {}
    for flag, path in (("data", args.data), ("val", args.val), ("test", args.test)):
        if path:
            try:
                infos[flag] = hdf5_info(path, args.x_key, args.y_key)
            except (OSError, ValueError) as e:
                raise ValueError(f"--{flag} {path}: {e}") from None
            first, this = infos["data"], infos[flag]
            if this.volume_shape != first.volume_shape:
                raise ValueError(f"--{flag} {path}: its volumes have shape {this.volume_shape}, the "
                                 f"training volumes {first.volume_shape}")
            if this.num_classes > first.num_classes:
                raise ValueError(f"--{flag} {path}: it has {this.num_classes} classes, the training data "
                                 f"{first.num_classes}")
            if this.class_names and first.class_names and this.class_names != first.class_names[:this.num_classes]:
                raise ValueError(f"--{flag} {path}: its classes are {list(this.class_names)}, the training data's "
                                 f"{list(first.class_names)} (wrn3d-prepare --classes numbers a table as another)")
    info = infos["data"]
    with h5py.File(args.data, "r") as f:
        labels = np.asarray(f[args.y_key][()]).astype(np.int64).reshape(-1)
        norm = info.normalization
        if norm is None and args.normalize:
            norm = compute_normalization(f[args.x_key])
    augment = _augment(args, None)

    def split(flag):
        if flag not in infos:
            return None
        return lambda batch_size, training=False: hdf5_dataset(
            infos[flag].path, x_key=args.x_key, y_key=args.y_key, batch_size=batch_size, training=training,
            repeat=training, drop_remainder=training, seed=args.seed, num_classes=info.num_classes,
            normalization=data.normalization, augment=augment if training else False)   # the stats as last set

    source = "from the file" if info.normalization is not None else "computed" if norm is not None else "none"
    data = Data(train=split("data"), val=split("val"), test=split("test"), n_train=info.n, train_labels=labels,
                num_classes=info.num_classes, input_shape=tuple(info.volume_shape), class_names=info.class_names,
                normalization=norm, fingerprints={f"--{k}": fingerprint(v.path) for k, v in infos.items()},
                description=f"{info.n} volumes of {info.volume_shape} {info.dtype} in {args.data}, "
                            f"{info.num_classes} classes, normalisation {source}")
    return data


def _medmnist(args, run_dir):
    from wrn3d_tl.data import MEDMNIST3D, load_medmnist3d

    flag, _, size = args.data[len("medmnist:"):].partition("@")
    try:
        size = int(size or 28)
        splits = load_medmnist3d(flag, data_dir=args.data_dir, size=size, download=args.download,
                                 check_sizes=not args.no_check_sizes)
    except (OSError, ValueError) as e:
        raise ValueError(f"--data {args.data}: " + str(e).replace("pass check_sizes=False", "pass --no-check-sizes"))
    splits = _limited(splits, args.limit)
    return _from_arrays(args, splits, MEDMNIST3D[flag]["labels"], None,
                        {"--data": {"flag": flag, "size": size, **{k: len(v[1]) for k, v in splits.items()}}},
                        f"MedMNIST {flag} {size}^3", default_augment={"crop_padding": 2})


def _arrays(args, run_dir):
    from wrn3d_tl.data import load_cifar, synthetic_cifar

    if args.data == "synthetic":
        train, test = synthetic_cifar(args.synthetic_train, args.synthetic_test, num_classes=10, seed=args.seed)
        source = {"source": "synthetic", "seed": args.seed}
    else:   # asked for by name: missing files are an error, not a synthetic stand-in
        try:
            train, test = load_cifar(args.data, data_dir=args.data_dir, download=args.download)
        except (OSError, ValueError) as e:
            raise ValueError(f"--data {args.data}: {e}") from None
        source = {"source": args.data}
    splits = _limited({"train": train, "test": test}, args.limit)
    train = splits["train"]
    if args.val_split:
        keep, held = _split(train[1], args)
        splits = {"train": (train[0][keep], train[1][keep]), "val": (train[0][held], train[1][held]), "test": test}
    depth = args.volume_depth if args.dims == 3 else None
    prints = {"--data": {**source, **{k: len(v[1]) for k, v in splits.items()}}}
    return _from_arrays(args, splits, None, depth, prints, args.data, default_augment=True,
                        num_classes=100 if args.data == "cifar100" else 10)


def _limited(splits, limit):
    return {k: (x[:limit], y[:limit]) for k, (x, y) in splits.items()} if limit else splits


def _from_arrays(args, splits, class_names, depth, prints, description, *, default_augment, num_classes=None):
    from wrn3d_tl.data import compute_normalization, make_dataset

    x, y = splits["train"]
    norm = compute_normalization(x)
    augment = _augment(args, default_augment)

    def split(name):
        if name not in splits:
            return None
        return lambda batch_size, training=False: make_dataset(
            *splits[name], batch_size=batch_size, volume_depth=depth, tile_mode=args.tile_mode, training=training,
            seed=args.seed, normalization=norm, augment=augment if training else False, repeat=training,
            drop_remainder=training)

    shape = ((depth,) if depth else ()) + tuple(x.shape[1:])
    return Data(train=split("train"), val=split("val"), test=split("test"), n_train=len(y), train_labels=y,
                num_classes=num_classes or len(class_names), input_shape=shape,
                class_names=tuple(class_names) if class_names else None, normalization=norm, fingerprints=prints,
                description=description)

