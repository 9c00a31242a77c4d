"""Does the fast tier still catch what it caught? Break the library one way at a time, in a
copy of the repository, and run the fast tests of the files that should notice.

    .venv/bin/python tests/mutation_check.py            # every mutation (~2.5 minutes on 2 cores)
    .venv/bin/python tests/mutation_check.py nesterov   # one

Each mutation is a literal (old -> new) replacement in one library file; ``old`` must occur
exactly once (tests/test_mutations.py checks that, so the list cannot rot silently). A
mutation is CAUGHT when at least one fast-tier test of its files fails; the script prints
the failing tests and exits 1 if any mutation survives.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Mutation(NamedTuple):
    name: str
    path: str        # library file, relative to the repository
    old: str
    new: str
    tests: tuple     # the test files (relative) whose fast tests should catch it


MUTATIONS = (
    Mutation("bn-moving-average", "wrn3d_tl/layers.py",  # decay and (1 - decay) swapped
             "self.moving_mean.assign(self.moving_mean * self.decay + mean * (1.0 - self.decay))",
             "self.moving_mean.assign(self.moving_mean * (1.0 - self.decay) + mean * self.decay)",
             ("tests/test_layers.py",)),
    Mutation("label-range", "wrn3d_tl/batches.py",  # the upper bound of the in-graph label check dropped
             "bad = tf.logical_or(y < 0, y >= self.num_classes)", "bad = y < 0",
             ("tests/test_faults.py",)),
    Mutation("nesterov", "wrn3d_tl/optim.py",  # plain momentum where Nesterov was asked for
             "momentum=tf.constant(self.momentum), use_nesterov=self.nesterov)",
             "momentum=tf.constant(self.momentum), use_nesterov=False)",
             ("tests/test_optim.py",)),
    Mutation("checkpoint-digest", "wrn3d_tl/checkpoint.py",  # the file checksum is never compared
             "or digest != _file_digest(fh):", "or False:",
             ("tests/test_faults.py", "tests/test_checkpoint_manager.py")),
    Mutation("nifti-axis-order", "wrn3d_tl/data/nifti.py",  # i and k swapped: W, H, D instead of D, H, W
             "data = np.asarray(img.dataobj, dtype=np.float32)",
             "data = np.swapaxes(np.asarray(img.dataobj, dtype=np.float32), 0, 2)",
             ("tests/test_nifti.py",)),
    Mutation("inflation-centre", "wrn3d_tl/convert.py",  # the 2D kernel in the first depth slice
             "out[1] = kernel", "out[0] = kernel",
             ("tests/test_convert.py",)),
    Mutation("auc-definition", "wrn3d_tl/metrics.py",  # each class scored by its neighbour's column
             "out[k] = roc_auc_score(positive, s[:, k])", "out[k] = roc_auc_score(positive, s[:, (k + 1) % s.shape[1]])",
             ("tests/test_medical.py", "tests/test_report.py")),
    Mutation("in-graph-nan-check", "wrn3d_tl/batches.py",  # non-finite inputs never counted
             "nonfinite = tf.logical_not(tf.math.is_finite(tf.cast(x, tf.float32)))",
             "nonfinite = tf.zeros_like(x, tf.bool)",
             ("tests/test_faults.py",)),
)


def _copy_repository(dest):
    """The tracked files (and the working tree's edits to them), without .venv or .git."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if os.path.exists(os.path.join(ROOT, rel)):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), os.path.join(dest, rel))


def apply(mutation, root):
    """Replace ``old`` by ``new`` in ``root/path``; ``old`` must occur exactly once."""
    path = os.path.join(root, mutation.path)
    text = open(path, encoding="utf-8").read()
    if text.count(mutation.old) != 1:
        raise ValueError(f"{mutation.name}: {mutation.old!r} occurs {text.count(mutation.old)} times in {mutation.path}")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(mutation.old, mutation.new))


def run(mutation):
    """(caught, failing test ids) for one mutation, run in a fresh copy of the repository."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutation.name}-") as tmp:
        _copy_repository(tmp)
        apply(mutation, tmp)
        env = dict(os.environ, PYTHONPATH=tmp, WRN3D_TEST_INTRA_OP_THREADS="1")
        where = subprocess.run([sys.executable, "-c", "import wrn3d_tl; print(wrn3d_tl.__file__)"], cwd=tmp,
                               env=env, capture_output=True, text=True, check=True).stdout.strip()
        if not where.startswith(tmp):
            raise RuntimeError(f"the copy's wrn3d_tl is shadowed by {where}")
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                               "-n", "2", "--dist", "loadfile", "-rf", *mutation.tests],
                              cwd=tmp, env=env, capture_output=True, text=True)
        failed = sorted(set(re.findall(r"^FAILED (.+?)(?: - .*)?$", proc.stdout, re.M)))
        return proc.returncode == 1 and bool(failed), failed


def main(names):
    chosen = [m for m in MUTATIONS if not names or m.name in names]
    survivors = []
    for m in chosen:
        caught, failed = run(m)
        print(f"{m.name:20s} {'CAUGHT' if caught else 'SURVIVED'} by {len(failed)} test(s)")
        for test in failed:
            print(f"    {test}")
        if not caught:
            survivors.append(m.name)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
