#!/usr/bin/env python
"""What reading scans as scanners write them costs: reorientation, resampling to 1 mm, and a
DICOM series against its NIfTI conversion.

    python benchmarks/bench_scans.py                      # a 256^3 scan, 5 rounds
    python benchmarks/bench_scans.py --size 128 --rounds 3 --out /tmp/scans.json

1. **Per scan, 256^3** (``--size``) float32 voxels, CT-like (a body ellipsoid in air, noise):
   * reorientation LPS -> RAS (``wrn3d_tl.data.geometry.reorient``: a flip of two axes and
     a copy);
   * resampling to 1 mm with linear interpolation, from 0.9 x 0.9 x 3 mm (a thick-slice CT,
     256 x 256 x 256 -> 230 x 230 x 768) and from 0.5 mm isotropic (-> 128^3), by three
     implementations: ``geometry.resample`` (``scipy.ndimage.affine_transform`` with a
     diagonal matrix, what the library uses), ``scipy.ndimage.zoom(order=1, grid_mode=True)``
     and ``nibabel.processing.resample_to_output(order=1)``, each the median of ``--rounds``
     rounds, alternating;
   * ``read_scan`` of the thick-slice scan stored as an LPS ``.nii.gz`` (int16 with a slope,
     what scanners write): as stored, and with ``orientation="RAS", spacing=(1, 1, 1)``.
2. **DICOM against NIfTI**: the same ``--size`` x ``--size`` x ``--slices`` int16 volume
   as one DICOM series (one uncompressed file per slice, written with pydicom), as
   ``.nii.gz`` and as ``.nii``; ``read_scan`` of each, ``--rounds`` times alternating, as
   volumes/s and MB of voxels/s (float32 out). The files are in the page cache: this
   measures decoding, not disk.

One thread does each measurement (scipy.ndimage and nibabel use one; the pipelines read
several files in parallel threads). Output: a table on stdout and a JSON record in
``--out`` (default ``benchmarks/results/scans_<cpu-slug>.json``) with the CPU model, its
flags and the package versions.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_HERE = os.path.dirname(os.path.abspath(__file__))
# bench_nifti's machine facts; the tests' DICOM series writer (pydicom), the one the tests read
for _path in (_HERE, os.path.join(os.path.dirname(_HERE), "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256, help="voxels per axis of the scan")
    p.add_argument("--slices", type=int, default=64, help="slices of the DICOM series (and its NIfTI)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of each measurement (after a warm-up)")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/scans_<cpu-slug>.json)")
    return p.parse_args(argv)


def body(shape, seed=0):
    """CT-like Hounsfield units: an ellipsoid of soft tissue in air, with noise (float32)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij"))
    inside = (grid ** 2).sum(axis=0) < 0.7
    return np.where(inside, 40.0, -1000.0).astype(np.float32) + rng.normal(0, 20, shape).astype(np.float32)


def median_times(fns, rounds):
    """{name: median seconds} of each callable, after one warm-up call each, alternating."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def resampling(size, rounds):
    import nibabel as nib
    from nibabel.processing import resample_to_output
    from scipy.ndimage import zoom

    from wrn3d_tl.data.geometry import reorient, resample

    x = body((size,) * 3)
    out = {}
    lps = np.diag([-0.9, -0.9, 3.0, 1.0])
    out["reorient_lps_to_ras_s"] = median_times({"r": lambda: reorient(x, lps, "RAS")}, rounds)["r"]
    for name, sizes in (("thick_0.9x0.9x3mm", (0.9, 0.9, 3.0)), ("iso_0.5mm", (0.5, 0.5, 0.5))):
        affine = np.diag(list(sizes) + [1.0])
        img = nib.Nifti1Image(x, affine)
        times = median_times({
            "geometry.resample": lambda: resample(x, affine, (1.0, 1.0, 1.0)),
            "scipy.ndimage.zoom": lambda: zoom(x, np.array(sizes), order=1, mode="nearest", grid_mode=True),
            "nibabel.processing": lambda: resample_to_output(img, (1.0, 1.0, 1.0), order=1),
        }, rounds)
        shape = resample(x, affine, (1.0, 1.0, 1.0))[0].shape
        out[name] = {"from_shape": [size] * 3, "to_shape": list(shape), "seconds": times}
    return out


def end_to_end(size, rounds, tmp):
    import nibabel as nib

    from wrn3d_tl.data import read_scan

    x = body((size,) * 3)
    path = os.path.join(tmp, "thick_lps.nii.gz")
    affine = np.diag([-0.9, -0.9, 3.0, 1.0])
    img = nib.Nifti1Image(np.round((x + 1024) * 2).astype(np.int16), affine)
    img.header.set_slope_inter(0.5, -1024)
    nib.save(img, path)
    times = median_times({
        "as stored": lambda: read_scan(path),
        "orientation RAS + spacing 1 mm": lambda: read_scan(path, orientation="RAS", spacing=(1.0, 1.0, 1.0)),
    }, rounds)
    return {"file": "int16 .nii.gz with slope, LPS, 0.9x0.9x3 mm", "shape": [size] * 3, "seconds": times}


def dicom_vs_nifti(size, slices, rounds, tmp):
    import nibabel as nib

    from _dicom_series import write_series
    from wrn3d_tl.data import read_scan
    from wrn3d_tl.data.dicom import read_series

    data = np.round(body((size, size, slices)) * 2) / 2          # 0.5 HU steps: int16 codes with a slope
    folder = write_series(os.path.join(tmp, "series"), data)
    _, affine, _ = read_series(folder, pixels=False)
    paths = {"DICOM series (uncompressed)": folder}
    for suffix in (".nii.gz", ".nii"):
        paths[f"NIfTI {suffix}"] = os.path.join(tmp, "volume" + suffix)
        img = nib.Nifti1Image(np.round((data + 1024) * 2).astype(np.int16), affine)
        img.header.set_slope_inter(0.5, -1024)
        nib.save(img, paths[f"NIfTI {suffix}"])
    same = [read_scan(p)[0] for p in paths.values()]
    assert all(np.array_equal(same[0], other) for other in same[1:]), "the three files must hold one volume"
    times = median_times({name: (lambda p=p: read_scan(p)) for name, p in paths.items()}, rounds)
    megabytes = size * size * slices * 4 / 1e6
    return {"shape": [size, size, slices], "files": {n: len(os.listdir(p)) if os.path.isdir(p) else 1
                                                     for n, p in paths.items()},
            "seconds": times, "volumes_per_s": {n: 1 / t for n, t in times.items()},
            "mb_per_s": {n: megabytes / t for n, t in times.items()}}


def main(argv=None):
    args = parse_args(argv)
    from bench_nifti import cpu_slug, machine

    from wrn3d_tl import cpu

    record = {"benchmark": "bench_scans", "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:] if argv is None
              else list(argv), "machine": machine(("numpy", "scipy", "nibabel", "pydicom")),
              "cpu_flags": cpu.cpu_flags(relevant_only=True)}
    print("resampling ...", file=sys.stderr, flush=True)
    record["per_scan"] = resampling(args.size, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        print("read_scan ...", file=sys.stderr, flush=True)
        record["read_scan"] = end_to_end(args.size, args.rounds, tmp)
        print("DICOM against NIfTI ...", file=sys.stderr, flush=True)
        record["dicom_vs_nifti"] = dicom_vs_nifti(args.size, args.slices, args.rounds, tmp)
    out = args.out or os.path.join(_HERE, "results",
                                   f"scans_{cpu_slug(record['machine']['cpu'], record['machine']['cores'])}.json")
    with open(out, "w") as fh:
        json.dump(record, fh, indent=1)
    print(f"reorientation LPS -> RAS of {args.size}^3: {record['per_scan']['reorient_lps_to_ras_s'] * 1e3:.0f} ms")
    for name in ("thick_0.9x0.9x3mm", "iso_0.5mm"):
        r = record["per_scan"][name]
        print(f"resample {name} {r['from_shape']} -> {r['to_shape']}: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in r["seconds"].items()))
    print("read_scan: " + ", ".join(f"{k} {v:.2f} s" for k, v in record["read_scan"]["seconds"].items()))
    d = record["dicom_vs_nifti"]
    print(f"decode {d['shape']}: " + ", ".join(f"{k} {d['volumes_per_s'][k]:.1f} volumes/s "
                                             f"({d['mb_per_s'][k]:.0f} MB/s)" for k in d["seconds"]))
    print(f"-> {out}", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
