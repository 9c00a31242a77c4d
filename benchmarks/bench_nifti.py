#!/usr/bin/env python
"""Does input keep up? NIfTI (.nii.gz) and HDF5 streaming against the WRN-16-4 3D train step.

    python benchmarks/bench_nifti.py                              # defaults: 64 volumes 32x32x32x1, batch 8
    python benchmarks/bench_nifti.py --n 128 --shape 64,64,64 --batch-size 4 --batches 32
    python benchmarks/bench_nifti.py --dtype float32 --train-steps 5 --out /tmp/nifti.json

What it does, in one process:

1. Writes ``--n`` synthetic NIfTI volumes (nibabel, ``.nii.gz``; by default int16 with a
   scaling slope/intercept, like most scanners' output; ``--dtype float32`` for raw floats)
   and a ``labels.csv`` (``path,label``) into a temporary folder. Each volume is CT-like:
   air around a soft-tissue ellipsoid holding a lesion whose size depends on the label,
   plus noise (int16 codes at 0.5 HU, which gzip compresses about 1.4x).
2. Measures, each after one untimed warm-up pass (one epoch of batches from the same
   iterator), ``--batches`` batches of

   * ``wrn3d_tl.data.nifti_dataset(csv, batch_size=B, training=True, repeat=True)``
     (``intensity="zscore"``, the default: gzip + nibabel + z-score per volume);
   * ``wrn3d_tl.data.hdf5_dataset(out.h5, batch_size=B, training=True, augment=False,
     normalization=None, repeat=True)`` over the file written once by
     ``nifti_to_hdf5(csv, out.h5)`` (the one-off conversion time is reported too);
   * for reference, ``NiftiVolumes.read(i)`` (the function ``nifti_dataset`` maps) in a
     plain Python loop on one thread: the decoding cost of one volume with no
     parallelism at all.

   Besides batches/s and volumes/s, the CPU time the process used per wall second
   ("cores busy", from ``getrusage``) is recorded: a decoding pipeline that runs in
   parallel on 2 cores shows close to 2.
3. Times ``Trainer.train_step(x, y)`` of WRN-16-4 3D (fp32, ``lr=0.01``) on the same
   volume shape and batch size: a fixed in-memory batch, 2 warm-up steps, then
   ``--train-steps`` rounds of two steps back to back, one on the fixed batch and one on a
   batch pulled from a live ``nifti_dataset`` iterator (order alternating per round), so
   "does input keep up" is also measured directly: the median over the rounds of
   (nifti-fed step time / pre-made step time).

The files are written just before they are read, so they are in the page cache: this
measures decoding (gzip inflate, nibabel, z-score), not disk reads. Machine noise (CPU
used by other processes, time stolen by the hypervisor, in cores) is measured from
/proc/stat over each timing and kept in the JSON.

Output: a markdown table (source | batches/s | volumes/s | vs. WRN-16-4 step, the last
being the source's volumes/s over the train step's) on stdout, progress on stderr, and a
JSON record in ``--out`` (default ``benchmarks/results/nifti_input_<cpu-slug>.json``, the
slug made from /proc/cpuinfo's model name and the core count).
"""

import argparse
import csv
import importlib.metadata
import json
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
import wrn3d_tl  # noqa: E402,F401  (before TensorFlow: oneDNN on where TensorFlow leaves it off)

import numpy as np  # noqa: E402


def log(msg):
    print(f"[bench_nifti {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- machine
cpu_model = wrn3d_tl.cpu.cpu_model   # the results/ naming below and the other benchmarks use it


def cpu_slug(model, cores):
    """'AMD EPYC 7B13 64-Core Processor' -> 'amd-epyc-7b13-2core' (the results/ naming:
    CPU and core count, no trademarks, frequencies or filler words)."""
    s = re.sub(r"\((r|tm|c)\)", " ", model, flags=re.I)
    s = re.sub(r"@.*$", " ", s)
    s = re.sub(r"\b(cpu|processor|\d+-core)\b", " ", s, flags=re.I)
    s = "-".join(re.findall(r"[a-z0-9]+", s.lower())) or "cpu"
    return f"{s}-{cores}core"


def machine(packages):
    """The benchmark machine for a results file: CPU model, cores, Python, and the installed
    version of each of ``packages`` (those not installed are left out)."""
    env = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()}
    for pkg in packages:
        try:
            env[pkg] = importlib.metadata.version(pkg)
        except Exception:  # noqa: BLE001
            pass
    return env


def environment():
    return machine(("tensorflow", "numpy", "tensorlayer", "nibabel", "h5py"))


class Usage:
    """Wall time, this process's CPU time, and the CPU time of everything else on the machine
    (``/proc/stat`` busy minus ours) and stolen by the hypervisor, between start and stop."""

    @staticmethod
    def _sample():
        ru = resource.getrusage(resource.RUSAGE_SELF)
        busy = steal = None
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            tick = os.sysconf("SC_CLK_TCK")
            # user nice system idle iowait irq softirq steal ...
            busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / tick
            steal = (v[7] if len(v) > 7 else 0) / tick
        except (OSError, ValueError):
            pass
        return time.perf_counter(), ru.ru_utime + ru.ru_stime, busy, steal

    def __enter__(self):
        self.start = self._sample()
        return self

    def __exit__(self, *exc):
        end = self._sample()
        self.wall = end[0] - self.start[0]
        self.cpu = end[1] - self.start[1]
        self.cores_busy = self.cpu / self.wall if self.wall > 0 else float("nan")
        if end[2] is not None and self.start[2] is not None:
            self.external = max(0.0, (end[2] - self.start[2]) - self.cpu) / self.wall
            self.steal = (end[3] - self.start[3]) / self.wall
        else:
            self.external = self.steal = None
        return False

    def record(self):
        r = lambda v: None if v is None else round(v, 3)  # noqa: E731
        return {"wall_s": r(self.wall), "cpu_s": r(self.cpu), "cores_busy": r(self.cores_busy),
                "external_cores": r(self.external), "steal_cores": r(self.steal)}


# ------------------------------------------------------------------------ synthetic data
SLOPE, INTER = 0.5, -1024.0     # int16 codes -> CT-like units: value = 0.5 * code - 1024


def synthetic_volume(rng, label, grids, channels):
    """A CT-like float32 (D, H, W, C) volume: air (-1000) around a soft-tissue ellipsoid (40)
    holding a brighter lesion (+300) whose size depends on ``label``, plus noise."""
    zz, yy, xx = grids

    def soft(radius, centre, sharp=10.0):
        r2 = ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) / radius ** 2
        return 1.0 / (1.0 + np.exp((r2 - 1.0) * sharp))

    body = soft(0.85 + 0.05 * rng.random(), rng.uniform(-0.05, 0.05, 3))
    lesion = soft((0.25 if label else 0.4) + 0.1 * rng.random(), rng.uniform(-0.2, 0.2, 3))
    vol = -1000.0 + 1040.0 * body + 300.0 * lesion * body
    noise = rng.normal(0.0, 1.0, vol.shape + (channels,)).astype(np.float32) * (5.0 + 15.0 * body)[..., None]
    return (vol[..., None] + noise).astype(np.float32)


def write_volumes(folder, n, shape, dtype, seed):
    """``n`` .nii.gz files and a labels.csv in ``folder``; returns (csv path, facts).

    int16: the codes ``round((value - INTER) / SLOPE)`` with the header's scl_slope/scl_inter
    set to SLOPE/INTER, so readers must apply the scaling (nibabel's ``dataobj`` does)."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    d, h, w, c = shape
    grids = np.meshgrid(*(np.linspace(-1, 1, s, dtype=np.float32) for s in (d, h, w)), indexing="ij")
    rows, raw_bytes, file_bytes = [], 0, 0
    for i in range(n):
        label = i % 2
        vol = synthetic_volume(rng, label, grids, c)
        if c == 1:
            vol = vol[..., 0]
        if dtype == "int16":
            codes = np.clip(np.round((vol - INTER) / SLOPE), -32768, 32767).astype(np.int16)
            img = nib.Nifti1Image(codes, np.eye(4))
            img.header.set_slope_inter(SLOPE, INTER)
        else:
            img = nib.Nifti1Image(vol, np.eye(4), dtype=np.float32)
        name = f"vol{i:04d}.nii.gz"
        path = os.path.join(folder, name)
        nib.save(img, path)
        rows.append((name, label))
        raw_bytes += vol.size * np.dtype(dtype).itemsize
        file_bytes += os.path.getsize(path)
    if dtype == "int16":
        back = nib.load(os.path.join(folder, rows[0][0]))
        if (float(back.dataobj.slope), float(back.dataobj.inter)) != (SLOPE, INTER):
            raise RuntimeError(f"nibabel did not keep the scaling: slope {back.dataobj.slope}, "
                               f"intercept {back.dataobj.inter}")
    table = os.path.join(folder, "labels.csv")
    with open(table, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["path", "label"])
        wr.writerows(rows)
    facts = {"stored_dtype": dtype, "raw_mb": round(raw_bytes / 2**20, 2), "gz_mb": round(file_bytes / 2**20, 2),
             "compression_ratio": round(raw_bytes / max(1, file_bytes), 2)}
    if dtype == "int16":
        facts.update(scl_slope=SLOPE, scl_inter=INTER)
    return table, facts


# -------------------------------------------------------------------------- timings
def time_stream(ds, batch_size, warmup_batches, batches):
    """Batches/s and volumes/s of a tf.data iterator after ``warmup_batches`` untimed ones."""
    it = iter(ds)
    t0 = time.perf_counter()
    for _ in range(warmup_batches):
        next(it)
    first = time.perf_counter() - t0
    volumes = 0
    with Usage() as u:
        for _ in range(batches):
            x, _ = next(it)
            volumes += int(x.shape[0])
    del it
    return {"batches": batches, "volumes": volumes, "batches_per_s": batches / u.wall,
            "volumes_per_s": volumes / u.wall, "warmup_s": round(first, 3), **u.record()}


def time_serial_reads(table, batch_size, passes=1):
    """NiftiVolumes.read(i) in a Python loop, one thread: one warm-up pass, then ``passes``."""
    from wrn3d_tl.data import NiftiVolumes
    vols = NiftiVolumes(table, labels=True)
    for i in range(len(vols)):
        vols.read(i)
    with Usage() as u:
        for _ in range(passes):
            for i in range(len(vols)):
                vols.read(i)
    n = passes * len(vols)
    return {"batches": n / batch_size, "volumes": n, "batches_per_s": n / batch_size / u.wall,
            "volumes_per_s": n / u.wall, **u.record()}


def time_training(shape, batch_size, x, y, steps, nifti_ds):
    """WRN-16-4 3D train step: 2 warm-up steps, then ``steps`` rounds of (pre-made batch,
    batch pulled from ``nifti_ds``), order alternating per round."""
    from wrn3d_tl.model import WRNConfig, build_wrn
    from wrn3d_tl.train import Trainer

    config = WRNConfig(depth=16, widen_factor=4, num_classes=2, input_shape=tuple(shape))
    trainer = Trainer(build_wrn(config), lr=0.01, normalization=None, verbose=False)
    it = iter(nifti_ds)
    warm = []
    for _ in range(2):
        t0 = time.perf_counter()
        trainer.train_step(x, y)
        warm.append(time.perf_counter() - t0)
    next(it)                                  # start the pipeline (threads, first files) untimed
    premade, fed, noise = [], [], []
    with Usage() as u:
        for r in range(steps):
            order = ("premade", "fed") if r % 2 == 0 else ("fed", "premade")
            for which in order:
                with Usage() as one:
                    if which == "premade":
                        trainer.train_step(x, y)
                    else:
                        xb, yb = next(it)
                        trainer.train_step(xb, yb)
                (premade if which == "premade" else fed).append(one.wall)
                noise.append((which, one.external))
    del it
    med, med_fed = statistics.median(premade), statistics.median(fed)
    # the two steps of a round run back to back: the median of the per-round ratios is the
    # number least sensitive to drifting machine load (as in bench_train.py)
    ratios = [f / p for f, p in zip(fed, premade)]
    return {"config": "WRN-16-4", "input_shape": list(shape), "batch": batch_size,
            "warmup_s": [round(t, 3) for t in warm], "premade_s": [round(t, 4) for t in premade],
            "nifti_fed_s": [round(t, 4) for t in fed],
            "step_external_cores": [[w, None if e is None else round(e, 3)] for w, e in noise],
            "median_s": med, "batches_per_s": 1 / med, "volumes_per_s": batch_size / med,
            "nifti_fed_median_s": med_fed, "nifti_fed_volumes_per_s": batch_size / med_fed,
            "nifti_fed_over_premade_rounds": [round(v, 4) for v in ratios],
            "nifti_fed_over_premade": statistics.median(ratios), **u.record()}


# ------------------------------------------------------------------------------ main
def parse_shape(text):
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        dims = ()
    if len(dims) not in (3, 4) or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"--shape takes D,H,W or D,H,W,C positive ints, got {text!r}")
    return dims if len(dims) == 4 else dims + (1,)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64, help="number of synthetic .nii.gz volumes (default 64)")
    p.add_argument("--shape", type=parse_shape, default=(32, 32, 32, 1),
                   help="volume shape D,H,W (one channel) or D,H,W,C (default 32,32,32)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size B of every measurement (default 8)")
    p.add_argument("--batches", type=int, default=64, help="timed batches per input source, after a warm-up "
                   "pass of ceil(N/B) batches (default 64)")
    p.add_argument("--dtype", choices=("int16", "float32"), default="int16",
                   help="voxel type stored in the files: int16 with a scaling slope/intercept (default) or float32")
    p.add_argument("--train-steps", type=int, default=4, help="timed WRN-16-4 rounds (one pre-made-batch and one "
                   "nifti-fed step each, order alternating) after 2 warm-up steps (default 4; 0 skips training)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic volumes")
    p.add_argument("--keep", default=None, help="write the volumes, labels.csv and out.h5 into this folder and "
                   "keep them (default: a temporary folder, deleted)")
    p.add_argument("--out", default=None, help="JSON output file (default "
                   "benchmarks/results/nifti_input_<cpu-slug>.json)")
    args = p.parse_args(argv)
    for name in ("n", "batch_size", "batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.train_steps < 0:
        p.error("--train-steps must be >= 0")
    return args


def _fmt_ratio(v):
    return "—" if v is None else f"{v:.1f}x" if v < 100 else f"{v:.0f}x"


def report(rows, train):
    train_vps = train and train["volumes_per_s"]
    print("\n| source | batches/s | volumes/s | vs. WRN-16-4 step |")
    print("|---|---:|---:|---:|")
    for label, r in rows:
        ratio = r["volumes_per_s"] / train_vps if train_vps else None
        print(f"| {label} | {r['batches_per_s']:.2f} | {r['volumes_per_s']:.1f} | {_fmt_ratio(ratio)} |")


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    from wrn3d_tl.data import hdf5_dataset, nifti_dataset, nifti_to_hdf5

    env = environment()
    shape, B, N = args.shape, args.batch_size, args.n
    out = args.out or os.path.join(_HERE, "results", f"nifti_input_{cpu_slug(env['cpu'], env['cores'])}.json")
    warm = -(-N // B)
    log(f"{env}; {N} volumes {'x'.join(map(str, shape))} {args.dtype}, batch {B}, {args.batches} timed batches "
        f"after {warm} warm-up")

    tmp = None
    if args.keep:
        folder = args.keep
        os.makedirs(folder, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_nifti_")
        folder = tmp.name
    try:
        t0 = time.perf_counter()
        table, facts = write_volumes(folder, N, shape, args.dtype, args.seed)
        facts["write_s"] = round(time.perf_counter() - t0, 2)
        log(f"wrote {N} files in {facts['write_s']} s: {facts}")

        results, rows = {}, []
        log("nifti_dataset ...")
        results["nifti_dataset"] = time_stream(
            nifti_dataset(table, batch_size=B, training=True, repeat=True), B, warm, args.batches)
        rows.append(("nifti_dataset (.nii.gz)", results["nifti_dataset"]))
        log(f"  {results['nifti_dataset']}")

        log("NiftiVolumes.read loop, 1 thread ...")
        results["serial_read"] = time_serial_reads(table, B)
        log(f"  {results['serial_read']}")

        h5 = os.path.join(folder, "out.h5")
        if os.path.exists(h5):
            os.remove(h5)
        with Usage() as u:
            nifti_to_hdf5(table, h5)
        conversion = {**u.record(), "volumes_per_s": N / u.wall, "h5_mb": round(os.path.getsize(h5) / 2**20, 2)}
        log(f"nifti_to_hdf5: {conversion}")

        log("hdf5_dataset ...")
        results["hdf5_dataset"] = time_stream(
            hdf5_dataset(h5, batch_size=B, training=True, augment=False, normalization=None, repeat=True),
            B, warm, args.batches)
        rows.append(("hdf5_dataset (after nifti_to_hdf5)", results["hdf5_dataset"]))
        log(f"  {results['hdf5_dataset']}")
        rows.append(("NiftiVolumes.read loop, 1 thread (reference)", results["serial_read"]))

        train = None
        if args.train_steps:
            log(f"WRN-16-4 train steps (2 warm-up + {args.train_steps} rounds) ...")
            x, y = next(iter(nifti_dataset(table, batch_size=B, training=False, drop_remainder=True, repeat=True)))
            train = time_training(shape, B, x.numpy(), y.numpy(), args.train_steps,
                                  nifti_dataset(table, batch_size=B, training=True, repeat=True, seed=1))
            log(f"  {train}")
            rows.append(("WRN-16-4 3D train step (fp32, pre-made batch)", train))
    finally:
        if tmp is not None:
            tmp.cleanup()

    report(rows, train)
    print(f"\nnifti_to_hdf5 (one-off): {conversion['wall_s']:.2f} s for {N} volumes "
          f"({conversion['volumes_per_s']:.0f} volumes/s, {conversion['cores_busy']:.2f} cores busy); "
          f".nii.gz {facts['gz_mb']} MB -> HDF5 {conversion['h5_mb']} MB")
    print("cores busy (process CPU s per wall s) while streaming: "
          + ", ".join(f"{k} {results[k]['cores_busy']:.2f}" for k in ("nifti_dataset", "hdf5_dataset", "serial_read")))
    if train:
        print(f"WRN-16-4 step: pre-made batch {train['median_s'] * 1e3:.0f} ms, batch pulled from nifti_dataset "
              f"{train['nifti_fed_median_s'] * 1e3:.0f} ms (medians of {args.train_steps}); nifti-fed / pre-made = "
              f"{train['nifti_fed_over_premade']:.3f} (median of the per-round ratios "
              f"{', '.join(f'{v:.2f}' for v in train['nifti_fed_over_premade_rounds'])})")
    noise = {k: (v["external_cores"], v["steal_cores"]) for k, v in
             [*results.items(), *([("train", train)] if train else [])]}
    print("machine noise (cores used by other processes / stolen): "
          + ", ".join(f"{k} {e:.2f}/{s:.2f}" for k, (e, s) in noise.items() if e is not None))
    noisy = [k for k, (e, s) in noise.items() if e is not None and e + s > 0.2]
    if noisy:
        print(f"WARNING: other processes used more than 0.2 of the {env['cores']} cores during {', '.join(noisy)}; "
              "those numbers are too low. Rerun on a quiet machine.")

    vs = {k: (v["volumes_per_s"] / train["volumes_per_s"] if train else None) for k, v in results.items()}
    record = {"kind": "nifti_input", "run": time.strftime("%Y-%m-%dT%H:%M:%S"), **env, "argv": sys.argv[1:],
              "shape": list(shape), "n": N, "batch_size": B, "timed_batches": args.batches,
              "warmup_batches": warm, "files": facts, "nifti_dataset": results["nifti_dataset"],
              "hdf5_dataset": results["hdf5_dataset"], "serial_read": results["serial_read"],
              "nifti_to_hdf5": conversion, "train_step": train,
              "vs_train_step": vs, "hdf5_over_nifti": results["hdf5_dataset"]["volumes_per_s"]
              / results["nifti_dataset"]["volumes_per_s"],
              "elapsed_s": round(time.perf_counter() - start, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"\nJSON: {out}\nTotal runtime: {record['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
