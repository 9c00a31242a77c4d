"""``wrn3d-export --checkpoint c.h5 --out DIR``: a checkpoint as a TensorFlow SavedModel
that serves raw volumes with TensorFlow alone. The library side is ``wrn3d_tl.export``."""

import os
import sys

from wrn3d_tl.commands import Parser, fail, quiet_tensorflow
from wrn3d_tl.config import INFERENCE_PRECISIONS

__all__ = ["main"]


def main(argv=None):
    """The ``wrn3d-export`` command: ``wrn3d-export --checkpoint c.h5 --out DIR``; returns
    the exit status (0 ok, 2 bad input, one line ``wrn3d-export: error: ...``)."""
    p = Parser(prog="wrn3d-export", description="Export a wrn3d_tl checkpoint as a TensorFlow SavedModel that "
               "takes raw volumes (its normalisation built in) and serves with TensorFlow alone.")
    p.add_argument("--checkpoint", required=True, help="checkpoint .h5 written by Trainer.save")
    p.add_argument("--out", required=True, help="output folder of the SavedModel (an existing SavedModel there "
                   "is replaced)")
    p.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="fp32",
                   help="bf16: the network computes in bfloat16, its convolution kernels stored as bfloat16")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return e.code
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return fail(p.prog, "--out", args.out, "is a file; give a folder for the SavedModel")
    saved_model = os.path.join(args.out, "saved_model.pb")
    if os.path.isdir(args.out) and os.listdir(args.out) and not os.path.exists(saved_model):
        return fail(p.prog, "--out", args.out, "is a folder holding something other than a SavedModel; "
                    "give a new or empty folder")
    quiet_tensorflow()
    from wrn3d_tl.data.reading import FILE_SIDE, describe_reading
    from wrn3d_tl.export import export_saved_model, input_expects
    from wrn3d_tl.predict import Predictor

    try:
        loaded = Predictor(args.checkpoint)   # read and checked once, before anything is written
    except (OSError, ValueError) as e:
        return fail(p.prog, "--checkpoint", args.checkpoint, e)
    try:
        export_saved_model(loaded, args.out, precision=args.precision)
    except OSError as e:
        return fail(p.prog, "--out", args.out, e)
    config, reading, norm, names = loaded.config, loaded.preprocessing, loaded.normalization, loaded.class_names
    in_graph = reading and {k: v for k, v in reading.items() if k not in FILE_SIDE}
    built_in = ", ".join(part for part in (reading and f"reading ({describe_reading(in_graph)})",
                                           norm and "normalisation") if part)
    if reading and any(k in reading for k in FILE_SIDE):
        built_in += f"; it expects {input_expects(reading)}"
    print(f"{p.prog}: SavedModel of {config.name} ({args.precision}) from {args.checkpoint} -> {args.out}; "
          + (f"built in: {built_in}; feed raw volumes" if built_in else "nothing built in: feed the volumes as the "
             "network was trained on them")
          + (f"; classes {', '.join(names)}" if names else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
