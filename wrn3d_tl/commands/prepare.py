"""``wrn3d-prepare scans/train.csv --out train.h5``: read a labelled NIfTI table (a CSV with
``path,label`` or a folder of class sub-folders) once, with the reading training will use,
and write the volumes to an HDF5 file that ``wrn3d-train --data train.h5`` streams. The
library side is ``wrn3d_tl.data.nifti_to_hdf5``."""

import os
import sys

from wrn3d_tl.commands import Parser, add_reading_flags, fail, quiet_tensorflow

__all__ = ["main"]

_CLI = "wrn3d-prepare"


def main(argv=None):
    """The ``wrn3d-prepare`` command; returns the exit status (0 ok, 2 bad input, one line
    ``wrn3d-prepare: error: ...``)."""
    p = Parser(prog=_CLI, description="Convert a labelled NIfTI table (CSV or class folders) to an HDF5 file of "
               "preprocessed float32 volumes, with a progress bar.")
    p.add_argument("table", help="CSV with path,label columns, or a folder with one sub-folder per class")
    p.add_argument("--out", required=True, help="the HDF5 file to write (replaced atomically)")
    add_reading_flags(p, intensity_default="zscore")
    p.add_argument("--classes", help="class names in index order, comma-separated (to number a val/test table as "
                   "the training one; default: sorted names, or the sub-folders)")
    p.add_argument("--compression", choices=["none", "gzip", "lzf"], default="none", help="HDF5 compression")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return e.code
    if not os.path.exists(args.table):
        return fail(p.prog, "table", args.table, "no such file or folder")
    if os.path.isdir(args.out):
        return fail(p.prog, "--out", args.out, "is a folder; give the HDF5 file's name")
    quiet_tensorflow()
    from wrn3d_tl.data import nifti_to_hdf5

    try:
        info = nifti_to_hdf5(args.table, args.out, target_shape=args.target_shape, intensity=args.intensity,
                             orientation=args.orientation, spacing=args.spacing,
                             classes=tuple(args.classes.split(",")) if args.classes else None,
                             compression=None if args.compression == "none" else args.compression, progress=None)
    except (OSError, ValueError) as e:
        return fail(p.prog, "table", args.table, e)
    names = ", ".join(info.class_names) if info.class_names else f"{info.num_classes} classes"
    print(f"{args.out}: {info.n} volumes of {info.volume_shape} float32 ({names})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
