"""``wrn3d-convert``: a PyTorch WRN (RobustBench/xternalz or szagoruyko layout) as a
wrn3d_tl checkpoint, optionally inflated to 3D with a new head. The library side is
``wrn3d_tl.convert``."""

import os
import sys

from wrn3d_tl.commands import Parser, existing_file, fail, positive_int, quiet_tensorflow
from wrn3d_tl.convert import LAYOUTS, from_torch, inflate

__all__ = ["main"]


def main(argv=None):
    """``wrn3d-convert --torch model.pt --out wrn.h5 [--volume-depth 8 --mode centre
    --in-channels 1 --num-classes 5]``: writes a wrn3d_tl checkpoint; exit status 2 with one
    line naming the argument on bad input."""
    p = Parser(prog="wrn3d-convert", description="Convert a PyTorch WRN (RobustBench/xternalz or szagoruyko "
               "layout) to a wrn3d_tl checkpoint, optionally inflated to 3D with a new head.")
    p.add_argument("--torch", required=True, type=existing_file, help=".pt/.pth (needs PyTorch) or .npz state dict")
    p.add_argument("--out", required=True, help="the wrn3d_tl checkpoint to write (.h5)")
    p.add_argument("--layout", choices=["auto", *LAYOUTS], default="auto", help="the source's key layout")
    p.add_argument("--input-size", type=positive_int, default=32, help="H = W of the source's images")
    p.add_argument("--volume-depth", type=positive_int, help="inflate to 3D volumes of this depth (None: stay 2D)")
    p.add_argument("--mode", choices=["centre", "mean"], default="centre", help="how 2D kernels inflate")
    p.add_argument("--in-channels", type=int, choices=[1], help="1: sum the stem over RGB for grey volumes")
    p.add_argument("--num-classes", type=positive_int, help="a fresh head with this many classes")
    p.add_argument("--mean", help="comma-separated per-channel means (raw units) stored as the normalisation")
    p.add_argument("--std", help="comma-separated per-channel stds, with --mean")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return e.code
    if os.path.isdir(args.out):
        return fail(p.prog, "--out", args.out, "is a folder; give the checkpoint file's name")
    if (args.mean is None) != (args.std is None):
        return fail(p.prog, "--mean" if args.std is None else "--std", args.mean or args.std,
                    "--mean and --std go together")
    if args.in_channels is not None and args.volume_depth is None:
        return fail(p.prog, "--in-channels", args.in_channels, "needs --volume-depth (it applies when inflating)")
    quiet_tensorflow()
    from wrn3d_tl.train import Trainer

    try:
        model = from_torch(args.torch, layout=args.layout, input_shape=(args.input_size, args.input_size, 3))
    except ImportError as e:
        return fail(p.prog, "--torch", args.torch, e)
    except (OSError, ValueError) as e:
        return fail(p.prog, "--torch", args.torch, e)
    if args.volume_depth is not None:
        model = inflate(model, volume_depth=args.volume_depth, mode=args.mode, in_channels=args.in_channels,
                        num_classes=args.num_classes)
    elif args.num_classes is not None:
        return fail(p.prog, "--num-classes", args.num_classes, "needs --volume-depth (a new head comes with inflation)")
    norm = None
    if args.mean is not None:
        try:
            norm = {"mean": [float(v) for v in args.mean.split(",")], "std": [float(v) for v in args.std.split(",")]}
        except ValueError as e:
            return fail(p.prog, "--mean/--std", f"{args.mean}/{args.std}", e)
    try:
        trainer = Trainer(model, normalization=norm, verbose=False)
    except ValueError as e:
        return fail(p.prog, "--mean/--std", f"{args.mean}/{args.std}", e)
    trainer.normalization_known = True  # stated by the flags: None means the source's own input units
    try:
        trainer.save(args.out)
    except OSError as e:
        return fail(p.prog, "--out", args.out, e)
    cfg = model.wrn_config
    print(f"{p.prog}: {cfg.name} {cfg.spatial_rank}D, input {cfg.input_shape}, {cfg.num_classes} classes -> "
          f"{args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
