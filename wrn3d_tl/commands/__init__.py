"""The top floor: the console scripts, one module each (``train``, ``prepare``, ``predict``,
``explain``, ``export``, ``convert``: argument parsing, one-line errors), and what they and
the main job share, here: one-line errors with exit status 2, every default in ``--help``, argument
types that name the flag, and a quiet TensorFlow start.

Imports nothing heavy: ``--help`` and argument errors come back at once. The library below
never imports this package.
"""

import argparse
import contextlib
import os
import sys

from wrn3d_tl.config import PRECISIONS, TOP_LAYERS
from wrn3d_tl.validate import check_orientation, check_spacing

__all__ = ["Parser", "positive_int", "non_negative_int", "positive_float", "non_negative_float", "existing_file",
           "intensity_arg", "shape_arg", "orientation_arg", "spacing_arg", "add_reading_flags", "batch_size_arg", "error_line", "fail", "die", "quiet_tensorflow",
           "versions_line",
           "add_training_flags", "add_scale_flags", "add_tiling_flags", "check_training_flags"]


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the versions, the CPU and whether oneDNN is on, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(versions_line())
        parser.exit(0)


def versions_line():
    """``wrn3d_tl 0.1.0, TensorFlow 2.21.0, oneDNN on (TF_ENABLE_ONEDNN_OPTS=1), CPU <model>
    (<flags>[; <variables capping the kernels to AVX2>])``: what decides speed and numerics
    here, in one line (imports TensorFlow)."""
    import wrn3d_tl
    from wrn3d_tl import cpu

    tf = quiet_tensorflow()
    cap = cpu.capping()
    caps = f"; {cap}" if cap else ""
    return (f"wrn3d_tl {wrn3d_tl.__version__}, TensorFlow {tf.__version__}, {cpu.onednn_status()}, "
            f"CPU {cpu.cpu_model()} ({' '.join(cpu.cpu_flags(relevant_only=True)) or 'no AVX2'}{caps})")


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in ``--help``, except where saying it would mislead: required flags, and
    help that already says its default in words ("(default: all)")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or "(default" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are ONE line, ``prog: error: ...`` (exit
    status 2, no usage block), whose ``--help`` shows every default, and which has
    ``--version`` (versions, CPU, oneDNN on or off)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", _Defaults)
        super().__init__(**kwargs)
        self.add_argument("--version", action=_Version)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


def _number(text, cast, ok, rule):
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {rule}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {rule}, got {text!r}")
    return value


def positive_int(text):
    """An argparse type: an int >= 1."""
    return _number(text, int, lambda v: v >= 1, "a positive int")


def non_negative_int(text):
    """An argparse type: an int >= 0."""
    return _number(text, int, lambda v: v >= 0, "an int >= 0")


def positive_float(text):
    """An argparse type: a finite float > 0."""
    return _number(text, float, lambda v: 0 < v < float("inf"), "a number > 0")


def non_negative_float(text):
    """An argparse type: a finite float >= 0."""
    return _number(text, float, lambda v: 0 <= v < float("inf"), "a number >= 0")


def intensity_arg(text):
    """An argparse type for a NIfTI intensity step: ``zscore``, ``zscore_nonzero``, ``none``
    or ``window:LO:HI`` (CT window, e.g. ``window:-1000:400``)."""
    if text in ("zscore", "zscore_nonzero"):
        return text
    if text == "none":
        return None
    parts = text.split(":")
    if len(parts) == 3 and parts[0] == "window":
        try:
            lo, hi = float(parts[1]), float(parts[2])
        except ValueError:
            lo = hi = float("nan")
        if lo < hi and abs(lo) < float("inf") and abs(hi) < float("inf"):
            return ("window", lo, hi)
    raise argparse.ArgumentTypeError(f"expected zscore, zscore_nonzero, none or window:LO:HI with LO < HI, "
                                     f"got {text!r}")


def shape_arg(text):
    """An argparse type: three positive ints ``D,H,W``."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive ints D,H,W, got {text!r}")
    return shape


def orientation_arg(text):
    """An argparse type: axis codes such as ``RAS`` or ``LPS`` (one of each pair L/R, P/A, I/S)."""
    try:
        return check_orientation(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three axis codes, one of each pair L/R, P/A, I/S (e.g. RAS), "
                                         f"got {text!r}") from None


def spacing_arg(text):
    """An argparse type: voxel sizes in mm, ``D,H,W`` or one number for all three axes."""
    try:
        values = [float(v) for v in text.split(",")]
        return check_spacing(values * 3 if len(values) == 1 else values)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected voxel sizes in mm, D,H,W or one number (e.g. 1), "
                                         f"got {text!r}") from None


def add_reading_flags(parser, *, intensity_default=None):
    """How scans are read, for the commands that read them for training (``wrn3d-train``,
    ``wrn3d-prepare``): ``--orientation``, ``--spacing``, ``--intensity``, ``--target-shape``,
    in the order they are applied (``wrn3d_tl.data.reading``)."""
    a = parser.add_argument
    a("--orientation", type=orientation_arg, help="NIfTI/DICOM: reorder/flip each scan's axes by its affine to "
      "these axis codes, e.g. RAS (recommended when scans come from several scanners) (default: as stored)")
    a("--spacing", type=spacing_arg, help="NIfTI/DICOM: resample each scan linearly to these voxel sizes in mm, "
      "D,H,W in the output axis order or one number (default: as stored)")
    a("--intensity", type=intensity_arg, default=intensity_default,
      help="NIfTI/DICOM: zscore, zscore_nonzero, none or window:LO:HI")
    a("--target-shape", type=shape_arg, help="NIfTI/DICOM: centre crop / zero pad every scan to D,H,W")


def existing_file(text):
    """An argparse type: the path of an existing file (not a folder)."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: is a folder, not a file")
    return text


def add_training_flags(parser, *, iters_help):
    """The flags the main job and ``wrn3d-train`` share: the network, the optimisation, the run's
    length, checkpoints, precision and logs. Each script sets their defaults with
    ``parser.set_defaults`` (``--help`` shows them)."""
    a = parser.add_argument
    a("--depth", type=int, help="WRN depth d = 6n + 4 (10, 16, 22, 28, 40, ...)")
    a("--width", type=int, help="widening factor k >= 1")
    a("--dropout", type=float, help="dropout between a block's convolutions, in [0, 1)")
    a("--lr", type=positive_float, help="base learning rate")
    a("--schedule", choices=["constant", "step", "cosine"],
      help="learning-rate schedule; step: the paper's x0.2 at 30%%, 60%%, 80%% of the run; cosine: to 0 at its end")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--iters", type=positive_int, help=iters_help)
    group.add_argument("--epochs", type=positive_float, help="training epochs over the training data")
    a("--eval-every", type=non_negative_int, help="evaluate every N iterations (0: only at the end)")
    a("--checkpoint", help="checkpoint file written at every evaluation and at the end")
    a("--checkpoint-every", type=non_negative_int,
      help="also save {checkpoint dir}/ckpt-XXXXXXXX.h5 every N iterations (0: never)")
    a("--resume", action="store_true", help="continue from the newest verified checkpoint: --checkpoint or a "
      "ckpt-XXXXXXXX.h5 beside it. Precision may change, a constant schedule may be extended; other settings "
      "that differ from the checkpoint's are refused")
    a("--logdir", help="metrics.csv and TensorBoard scalars go here")
    a("--mixed-precision", choices=["none", *PRECISIONS[1:]], help="bf16: CPUs with AVX512_BF16/AMX; fp16: GPUs")
    a("--seed", type=int, help="data order, augmentation and initial weights")
    a("--init-from", type=existing_file, help="start from this wrn3d_tl checkpoint's network and weights (e.g. "
      "from wrn3d-convert); its depth, width, padding and strides replace --depth/--width")
    a("--freeze", nargs="+", metavar="PREFIX", help="train everything but the weights under these name prefixes "
      "(e.g. --freeze stem group1 group2)")


def batch_size_arg(text):
    """An argparse type: a positive int, or ``auto`` (the largest batch that fits the memory budget)."""
    return text if text == "auto" else positive_int(text)


def add_scale_flags(parser):
    """The flags of a run's size and spread, shared by the main job and ``wrn3d-train``: the
    batch (``N`` or ``auto`` within ``--memory-budget``), warm-up and weight decay, and where
    it runs (``--distribute``, ``--cpu-replicas``, ``--collective-timeout``)."""
    a = parser.add_argument
    a("--batch-size", type=batch_size_arg, help="global batch size, or 'auto': the largest that fits --memory-budget")
    a("--memory-budget", type=positive_float,
      help="GiB for --batch-size auto: the training state and one step (weights, momentum, gradients, "
           "activations, TensorFlow's working memory: estimate_memory's total). Not the whole process: the data and "
           "TensorFlow itself come on top. None: half of this machine's RAM, or on GPUs 80%% of each GPU's memory "
           "(per GPU: each holds its replica's share of the batch)")
    a("--warmup-steps", type=non_negative_int, help="linear learning-rate warm-up")
    a("--weight-decay", type=non_negative_float, help="L2 on convolution and dense kernels")
    a("--distribute", choices=["none", "mirrored", "multiworker"],
      help="mirrored: every local GPU (or --cpu-replicas N CPUs); multiworker: the cluster in TF_CONFIG")
    a("--cpu-replicas", type=positive_int, help="with --distribute mirrored: N logical CPU devices (testing)")
    a("--collective-timeout", type=positive_float, help="multiworker: seconds before a stalled all-reduce aborts")


def add_tiling_flags(parser):
    """How 2D images (CIFAR, the synthetic set) become volumes: ``--dims``, ``--volume-depth``,
    ``--tile-mode``, ``--synthetic-train``, ``--synthetic-test``."""
    a = parser.add_argument
    a("--dims", type=int, choices=[2, 3], help="3: tile images into volumes; 2: plain images")
    a("--volume-depth", type=positive_int, help="slices per volume (3D)")
    a("--tile-mode", choices=["repeat", "shift"], help="how images become volumes (docs/data.md)")
    a("--synthetic-train", type=positive_int, help="training samples of the synthetic set")
    a("--synthetic-test", type=positive_int, help="test samples of the synthetic set")


def check_training_flags(parser, args):
    """The shared flags' rules, checked after parsing and before any data is read; a
    broken one ends the program through ``parser.error`` (one line naming the flag).
    The network flags are checked by ``WRNConfig``'s own rules."""
    from wrn3d_tl.config import WRNConfig

    if args.resume and not args.checkpoint:
        parser.error("--resume needs --checkpoint")
    bad = [p for p in args.freeze or [] if p.split("/")[0] not in TOP_LAYERS]
    if bad:
        parser.error(f"--freeze {' '.join(args.freeze)}: {bad[0]!r} is not a layer prefix (stem, group1..3, head, "
                     "or below them, e.g. group2/block1)")
    if args.checkpoint_every and not args.checkpoint:
        parser.error("--checkpoint-every needs --checkpoint (its folder holds the periodic checkpoints)")
    if getattr(args, "cpu_replicas", None) is not None and args.distribute != "mirrored":
        parser.error("--cpu-replicas needs --distribute mirrored")
    if args.checkpoint and os.path.isdir(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint}: is a folder; give the checkpoint file's name (e.g. run/last.h5)")
    if args.logdir and os.path.exists(args.logdir) and not os.path.isdir(args.logdir):
        parser.error(f"--logdir {args.logdir}: is a file; give a folder for the logs")
    flags = {"depth": ("depth", args.depth), "width": ("widen_factor", args.width),
             "dropout": ("dropout", args.dropout)}
    try:
        WRNConfig(**{field: value for field, value in flags.values()})
    except ValueError as e:
        for flag, (field, value) in flags.items():
            prefix = f"WRNConfig.{field} "
            if str(e).startswith(prefix):
                parser.error(f"--{flag} {value}: {str(e)[len(prefix):]}")
        raise


def error_line(prog, message):
    """Print ONE line ``prog: error: message`` on stderr (the message's line breaks folded);
    returns 2, the exit status of a bad input."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return 2


def die(message, prog=None):
    """End a command-line program with ``error_line`` and exit status 2 (``prog`` defaults
    to the script's name)."""
    sys.exit(error_line(prog or os.path.basename(sys.argv[0]), message))


def fail(prog, flag, value, message):
    """Print ``prog: error: flag value: message`` as one line on stderr; returns 2."""
    return error_line(prog, f"{flag} {value}: {message}")


@contextlib.contextmanager
def _stderr_to_devnull():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet_tensorflow():
    """Import TensorFlow and probe its devices with stderr silenced, then return the module.

    TensorFlow's C++ start-up writes lines (oneDNN notes, "Could not find cuda drivers",
    "failed call to cuInit" on CPU-only machines) before its own log level applies; a
    command-line tool's stderr should hold only the tool's own lines. Errors raised by the
    import itself still surface as Python exceptions.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with _stderr_to_devnull():
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")
    return tf
