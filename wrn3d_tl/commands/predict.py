"""``wrn3d-predict``: class predictions of raw volumes with a checkpoint, as a CSV (and
Grad-CAM montages with ``--cam-dir``). The library side is ``wrn3d_tl.predict``.

    wrn3d-predict --checkpoint c.h5 --hdf5 data.h5 [--key volumes] --out preds.csv [--batch-size N]
    wrn3d-predict --checkpoint c.h5 --npy data.npy --out preds.csv
    wrn3d-predict --checkpoint c.h5 --nifti scans/ [--intensity zscore] [--target-shape D,H,W] --out preds.csv
    wrn3d-predict ... --cam-dir cams/      # also a Grad-CAM montage per volume (wrn3d_tl.explain)

Every error is one line ``wrn3d-predict: error: ...`` and exit status 2.
"""

import csv
import os
import sys

import h5py

from wrn3d_tl.commands import Parser, fail, intensity_arg, positive_int, quiet_tensorflow, shape_arg
from wrn3d_tl.config import INFERENCE_PRECISIONS
from wrn3d_tl.explain import write_cam_montages
from wrn3d_tl.files import written_atomically
from wrn3d_tl.predict import FROM_CHECKPOINT, Predictor, is_nifti_input, load_npy, write_csv

__all__ = ["add_input_flags", "open_inputs", "main", "CommandExit"]

_CLI = "wrn3d-predict"


def _or_checkpoint(kind):
    def parse(text):
        return FROM_CHECKPOINT if text == FROM_CHECKPOINT else kind(text)
    parse.__name__ = kind.__name__
    return parse


def add_input_flags(p):
    """The flags that name a checkpoint and the volumes to read (shared with ``wrn3d-explain``)."""
    p.add_argument("--checkpoint", required=True, help="checkpoint .h5 written by Trainer.save")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hdf5", help="HDF5 file holding the volumes (N, D, H, W, C) at --key")
    src.add_argument("--npy", help=".npy file holding the volumes (N, D, H, W, C)")
    src.add_argument("--nifti", help="a .nii/.nii.gz file, a folder of them, a DICOM series folder, or a CSV with a "
                     "path column")
    p.add_argument("--key", default="volumes", help="HDF5 dataset with the volumes")
    p.add_argument("--intensity", type=_or_checkpoint(intensity_arg), default=FROM_CHECKPOINT,
                   help="NIfTI intensity step: zscore, zscore_nonzero, none, window:LO:HI, or checkpoint (as the "
                        "training data was read, else zscore)")
    p.add_argument("--target-shape", type=_or_checkpoint(shape_arg), default=FROM_CHECKPOINT,
                   help="NIfTI: centre crop / zero pad to D,H,W, or checkpoint (as in training, else none)")
    p.add_argument("--preprocessed", action="store_true",
                   help="--npy/--hdf5 volumes already had the checkpoint's reading applied (per-volume intensity "
                        "step, crop/pad); without it raw volumes are read as the training files were")
    p.add_argument("--batch-size", type=positive_int, default=32, help="volumes per forward pass")


def _parser():
    p = Parser(prog=_CLI, description="Predict classes of raw volumes with a wrn3d_tl checkpoint; writes a CSV "
               "(index, class, probability, top5, top5_probabilities).")
    add_input_flags(p)
    p.add_argument("--out", required=True, help="output CSV file (a file name, not a folder)")
    p.add_argument("--top-k", type=positive_int, default=5, help="classes ranked per volume")
    p.add_argument("--cam-dir", help="also write a Grad-CAM montage per volume here ({index}_{class}.png)")
    p.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="fp32",
                   help="bf16: the network computes in bfloat16 (faster on CPUs with AMX/AVX512_BF16; the README "
                   "gives the change in predictions)")
    p.add_argument("--skip-bad", action="store_true",
                   help="--nifti: predict the files that read cleanly and list the others, with the reason, in "
                   "{out}_skipped.csv (without it a bad file stops the run before any inference)")
    return p


class CommandExit(Exception):
    """A command-line error already reported: carries the exit status."""


def open_inputs(prog, args):
    """Check the input flags of ``add_input_flags`` (before any model is loaded) and load the
    checkpoint: ``(predictor, volumes, src_flag, src, skipped)``. NIfTI inputs are read once
    (the check pass) before the model is loaded: a bad file ends the run, naming it, unless
    ``args.skip_bad``; then ``skipped`` lists ``(path, reason)`` of the files left out and
    ``volumes`` the rest. Raises ``CommandExit(2)`` after printing one line ``prog: error: --flag
    value: ...``."""
    def bad(flag, value, message):   # hints name this command's flag, not the Python argument
        message = str(message).replace("pass target_shape=(D, H, W)", "pass --target-shape D,H,W")
        raise CommandExit(fail(prog, flag, value, message))

    for flag, value in (("--intensity", args.intensity), ("--target-shape", args.target_shape)):
        if value != FROM_CHECKPOINT and args.nifti is None:
            bad(flag, value if isinstance(value, str) else ",".join(map(str, value or ["none"])),
                "applies to --nifti inputs only")
    if args.preprocessed and args.nifti is not None:
        bad("--preprocessed", "", "applies to --npy/--hdf5 volumes; --nifti files are always read raw")
    src_arg, src = next((f"--{name}", value) for name, value in
                        (("hdf5", args.hdf5), ("npy", args.npy), ("nifti", args.nifti)) if value is not None)
    if not (os.path.isfile(src) or (args.nifti is not None and os.path.isdir(src))):
        bad(src_arg, src, "no such file")
    skipped, files = [], None
    try:
        if args.npy is not None:
            volumes = load_npy(src)
        elif args.nifti is not None:
            if not is_nifti_input(src):
                raise ValueError("expected a .nii/.nii.gz file, a folder of them, a DICOM series folder or a .csv table")
            quiet_tensorflow()
            from wrn3d_tl.data.nifti import usable_files

            # every file read once now; shapes once the checkpoint's reading is known
            files, skipped = usable_files(src)
            _refuse_unless_skipping(args, files, skipped)
            volumes = src
        else:
            volumes = src
            if not h5py.is_hdf5(src):
                raise ValueError("not an HDF5 file")
    except (OSError, ValueError) as e:
        bad(src_arg, src, e)
    quiet_tensorflow()
    try:
        predictor = Predictor(args.checkpoint, precision=getattr(args, "precision", "fp32"))
    except (OSError, ValueError) as e:  # FileNotFoundError, CheckpointError
        bad("--checkpoint", args.checkpoint, e)
    if files is not None:
        from wrn3d_tl.data.nifti import NiftiVolumes, placeable

        try:
            reading = predictor.nifti_reading(args.intensity, args.target_shape)
            files, unplaced = placeable(files, reading)      # headers that cannot serve its orientation/spacing
            _refuse_unless_skipping(args, files, unplaced, len(skipped))
            skipped += unplaced
            volumes = NiftiVolumes.from_reading(files, reading)
        except ValueError as e:
            bad(src_arg, src, e)
    return predictor, volumes, src_arg, src, skipped


def _refuse_unless_skipping(args, files, bad, skipped_before=0):
    """ValueError listing the first bad files, unless ``--skip-bad`` says to go on without them."""
    if bad and not getattr(args, "skip_bad", False):
        raise ValueError(f"{len(bad)} of {files.n + len(bad) + skipped_before} files cannot be used: "
                         + "; ".join(m for _, m in bad[:3]) + ("; ..." if len(bad) > 3 else "")
                         + (" (pass --skip-bad to predict the others)" if hasattr(args, "skip_bad") else ""))


def main(argv=None):
    """The ``wrn3d-predict`` command; returns the exit status (0 ok, 2 bad input).

    Every argument is checked before the (slow) model load, and every error is one line
    ``wrn3d-predict: error: ...`` on stderr."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # the parser already printed its one line (or the help)
        return e.code
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out):
        return fail(_CLI, "--out", args.out, "is a folder; give the CSV file's name (e.g. preds.csv)")
    if not os.path.isdir(out_dir):
        return fail(_CLI, "--out", args.out, f"folder {out_dir!r} does not exist")
    if args.cam_dir is not None and os.path.exists(args.cam_dir) and not os.path.isdir(args.cam_dir):
        return fail(_CLI, "--cam-dir", args.cam_dir, "is a file; give a folder for the montages")
    if args.skip_bad and args.nifti is None:
        return fail(_CLI, "--skip-bad", "", "applies to --nifti inputs (files that may be unreadable)")
    try:
        predictor, volumes, src_arg, src, skipped = open_inputs(_CLI, args)
    except CommandExit as e:
        return e.args[0]
    reading = dict(key=args.key, intensity=args.intensity, target_shape=args.target_shape)
    try:
        out = predictor.predict(volumes, batch_size=args.batch_size, top_k=args.top_k,
                                preprocessed=args.preprocessed, **reading)
        if args.cam_dir is not None:
            with predictor.open(volumes, **reading) as (array, _):
                write_cam_montages(predictor, array, args.cam_dir, class_index=out["class"],
                                   batch_size=args.batch_size, preprocessed=args.preprocessed)
    except (OSError, ValueError) as e:
        return fail(_CLI, src_arg, src, e)
    skipped_csv = os.path.splitext(args.out)[0] + "_skipped.csv"
    try:
        write_csv(out, args.out, top_k=args.top_k)
        if skipped:
            with written_atomically(skipped_csv) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerows([("path", "reason")] + list(skipped))
    except OSError as e:
        return fail(_CLI, "--out", args.out, e)
    n = len(out["class"])
    print(f"{_CLI}: {n} prediction(s) from {args.checkpoint} -> {args.out}"
          + (f", {len(skipped)} file(s) skipped -> {skipped_csv}" if skipped else "")
          + (f", montages in {args.cam_dir}" if args.cam_dir else ""), file=sys.stderr)
    return 0



if __name__ == "__main__":
    sys.exit(main())
