"""``wrn3d-explain``: Grad-CAM montages (one PNG per volume) of chosen raw volumes with a
checkpoint. The library side is ``wrn3d_tl.explain``."""

import os
import sys

from wrn3d_tl.commands import Parser, fail, non_negative_int
from wrn3d_tl.commands.predict import CommandExit, add_input_flags, open_inputs
from wrn3d_tl.explain import DEFAULT_LAYER, cam_layers, write_cam_montages

__all__ = ["main"]

_CLI = "wrn3d-explain"


def main(argv=None):
    """The ``wrn3d-explain`` command: Grad-CAM montages of chosen volumes; returns the exit
    status (0 ok, 2 bad input, one line ``wrn3d-explain: error: ...``)."""
    p = Parser(prog=_CLI, description="Grad-CAM montages (one PNG per volume, {index}_{class}.png) of raw "
               "volumes with a wrn3d_tl checkpoint.")
    add_input_flags(p)
    p.add_argument("--out", required=True, help="folder for the PNGs (created)")
    p.add_argument("--nifti-out", metavar="DIR",
                   help="also write each map as a NIfTI file on its scan's own grid and affine, "
                        "{index}_{class}_{scan}.nii.gz, to overlay in ITK-SNAP / 3D Slicer / FSLeyes (--nifti only)")
    p.add_argument("--indices", help="comma-separated volume indices (default: all)")
    p.add_argument("--class", dest="class_index", type=non_negative_int,
                   help="explain this class (default: each volume's predicted class)")
    p.add_argument("--layer", help=f"feature map: stem/conv, groupG, groupG/blockB or {DEFAULT_LAYER} (default)")
    p.add_argument("--axis", type=int, choices=(0, 1, 2), default=0, help="slice along D (0), H (1) or W (2)")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return e.code
    for flag, value in (("--out", args.out), ("--nifti-out", args.nifti_out)):
        if value is not None and os.path.exists(value) and not os.path.isdir(value):
            return fail(_CLI, flag, value, "is a file; give a folder")
    if args.nifti_out is not None and args.nifti is None:
        return fail(_CLI, "--nifti-out", args.nifti_out, "needs --nifti input: maps go onto the scans' own grids")
    try:
        indices = None if args.indices is None else [int(v) for v in args.indices.split(",")]
    except ValueError:
        return fail(_CLI, "--indices", args.indices, "expected comma-separated ints")
    try:
        predictor, volumes, src_arg, src, _ = open_inputs(_CLI, args)
    except CommandExit as e:
        return e.args[0]
    config = predictor.config
    if args.class_index is not None and args.class_index >= config.num_classes:
        return fail(_CLI, "--class", args.class_index, f"the model has {config.num_classes} classes")
    if args.layer is not None:
        names, groups = cam_layers(config)
        if args.layer not in names and args.layer not in groups:
            return fail(_CLI, "--layer", args.layer, f"expected one of {sorted(groups) + names}")
    try:
        with predictor.open(volumes, key=args.key, intensity=args.intensity,
                            target_shape=args.target_shape) as (array, _):
            paths = write_cam_montages(predictor, array, args.out, indices=indices, class_index=args.class_index,
                                       layer=args.layer, axis=args.axis, batch_size=args.batch_size,
                                       preprocessed=args.preprocessed, nifti_out=args.nifti_out)
    except (OSError, ValueError) as e:
        flag, value = ("--indices", args.indices) if "indices must be" in str(e) else (src_arg, src)
        return fail(_CLI, flag, value, e)
    maps = sum(p.endswith(".nii.gz") for p in paths)
    print(f"{_CLI}: {len(paths) - maps} montage(s) -> {args.out}"
          + (f", {maps} NIfTI map(s) -> {args.nifti_out}" if args.nifti_out else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
