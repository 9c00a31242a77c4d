"""Fault and bad-input campaign: kill -9 during training, damaged checkpoints, bad batches
and volumes, and a property-based sweep over WRNConfig."""

import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wrn3d_tl.checkpoint import CheckpointError, read_checkpoint
from wrn3d_tl.model import WRNConfig, build_wrn, count_params, group_shapes
from wrn3d_tl.commands.predict import main as predict_main
from wrn3d_tl.predict import Predictor, predict
from wrn3d_tl.checkpoint import CheckpointManager
from wrn3d_tl.train import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "cifar_wide_resnet_tl.py")
CFG = WRNConfig(depth=10, widen_factor=1, num_classes=5, input_shape=(4, 16, 16, 3))
NORM = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
_CKPT = re.compile(r"^ckpt-(\d{8})\.h5$")


def _batch(seed, n=8):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n,) + CFG.input_shape).astype(np.float32), rng.integers(0, CFG.num_classes, n)


def _state(trainer):
    """Everything a step could change: weights, BN statistics, momentum, step."""
    out = {v.name: v.numpy().copy() for v in trainer.model.all_weights}
    out.update({"slot:" + s.name: s.numpy().copy() for s in trainer.optimizer.slots})
    out["step"] = np.array(trainer.step)
    return out


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _digests(folder):
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(folder))}


# =================================================================== kill -9

class _Run:
    """The example training script in a subprocess; a thread collects its output lines."""

    def __init__(self, argv):
        env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.proc = subprocess.Popen([sys.executable, "-u", EXAMPLE, *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self, n=25):
        return "\n".join(self.lines[-n:])

    def wait_for(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the reader drain
                raise AssertionError(f"training process exited ({self.proc.returncode}) before {what}:\n"
                                     f"{self.output()}")
            time.sleep(0.01)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{self.output()}")

    def find(self, pattern):
        for line in self.lines:
            m = re.search(pattern, line)
            if m:
                return m
        return None

    def kill9(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._reader.join(timeout=5)

    def cleanup(self):
        try:
            self.kill9()
        finally:
            self.proc.stdout.close()


@pytest.fixture
def runs():
    started = []
    yield started
    for run in started:  # every process this test started, whatever happened
        run.cleanup()


def _check_folder_after_kill(folder):
    """After a SIGKILL: every complete checkpoint verifies, the newest restores, temp files
    are ignored by CheckpointManager.latest and are themselves either refused or complete."""
    names = sorted(os.listdir(folder))
    leftovers = [n for n in names if ".tmp-" in n]
    complete = [n for n in names if _CKPT.match(n)]
    assert complete, f"no checkpoint on disk after the kill: {names}"
    newest = CheckpointManager(folder).latest()
    assert os.path.basename(newest) == complete[-1]
    for name in complete:
        ck = read_checkpoint(os.path.join(folder, name))
        assert ck["step"] == int(_CKPT.match(name).group(1)), name
    trainer = Trainer.restore(newest, verbose=False)
    step = int(_CKPT.match(os.path.basename(newest)).group(1))
    assert trainer.step == step
    assert trainer.normalization is not None
    for name in leftovers:  # a half-written file must never pass for a checkpoint
        m = re.match(rf"^\.(ckpt-\d{{8}}\.h5)\.tmp-{re.escape(socket.gethostname())}-\d+$", name)
        assert m, f"unexpected temp file {name}"
        try:
            ck = read_checkpoint(os.path.join(folder, name))
        except CheckpointError as e:
            assert name in str(e)
        else:  # killed between the last write and the rename (e.g. in fsync): complete and intact
            assert ck["step"] == int(_CKPT.match(m.group(1)).group(1))
    return newest, step, leftovers


# One training run, killed and resumed over and over: the resumed run is the next victim.
# "write": SIGKILL as soon as a checkpoint temp file appears, i.e. during a checkpoint write.
KILL_PLAN = ["random", "write"]


@pytest.mark.slow
def test_kill9_campaign(tmp_path, runs):
    rng = random.Random(20240611)  # the kill delays
    folder = str(tmp_path / "run")
    os.makedirs(folder)
    last = os.path.join(folder, "last.h5")
    argv = ["--dataset", "synthetic", "--depth", "10", "--width", "1", "--volume-depth", "2", "--batch-size", "8",
            "--iters", "1000", "--checkpoint-every", "1", "--checkpoint", last, "--eval-samples", "50"]
    t0 = time.monotonic()
    run = _Run(argv)
    runs.append(run)
    run.wait_for(lambda: CheckpointManager(folder).latest() is not None, 120, "the first checkpoint")
    report = []
    for trial, kind in enumerate(KILL_PLAN, start=1):
        before = CheckpointManager(folder).latest()
        temp_before = {n for n in os.listdir(folder) if ".tmp-" in n}
        if kind == "write":
            delay = None
            deadline = time.monotonic() + 60
            while not any(".tmp-" in n and n not in temp_before for n in os.listdir(folder)):
                assert run.proc.poll() is None and time.monotonic() < deadline, run.output()
            run.kill9()
        else:
            delay = rng.uniform(0.0, 1.2)
            time.sleep(delay)
            assert run.proc.poll() is None, run.output()
            run.kill9()
        assert run.proc.returncode == -signal.SIGKILL
        newest, step, leftovers = _check_folder_after_kill(folder)
        assert step >= int(_CKPT.match(os.path.basename(before)).group(1))

        run = _Run(argv + ["--resume"])
        runs.append(run)
        run.wait_for(lambda: run.find(r"resumed from .* at step \d+"), 120, "the 'resumed from' line")
        m = run.find(r"resumed from (.*) at step (\d+)")
        # --resume picks the newest intact checkpoint among --checkpoint and the ckpt-*.h5 beside it.
        assert os.path.realpath(m.group(1)) == os.path.realpath(newest) and int(m.group(2)) == step, m.group(0)
        run.wait_for(lambda: run.find(rf"^iter\s+{step + 3}/1000\b"), 60, f"iteration {step + 3}")
        assert run.find(rf"^iter\s+{step + 1}/1000\b"), "the resumed run must continue at step + 1"
        new_temp = len(set(leftovers) - temp_before)  # 1 = the kill interrupted a checkpoint write
        report.append((trial, kind, "-" if delay is None else f"{delay:.2f}", step, new_temp, len(leftovers)))
    run.cleanup()
    elapsed = time.monotonic() - t0
    print("\nkill -9 campaign (trial, kill, delay s, newest step = resumed step, new temp file, temp files "
          "on disk):")
    for row in report:
        print("  ", *row)
    print(f"   {len(report)} trials in {elapsed:.0f} s")
    assert any(kind == "write" and new for _, kind, _, _, new, _ in report), \
        "no kill landed inside a checkpoint write (no temp file was left behind)"


# ============================================================ damaged checkpoints

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ck")
    tf.random.set_seed(0)
    trainer = Trainer(build_wrn(CFG), lr=0.05, normalization=NORM, verbose=False)
    for s in range(2):
        trainer.train_step(*_batch(s))
    path = trainer.save(str(folder / "good.h5"))
    return path, read_checkpoint(path)


def _copy(src, dst):
    shutil.copyfile(src, dst)
    return str(dst)


def _refused(path, match):
    with pytest.raises(CheckpointError, match=match) as info:
        Trainer.restore(path, verbose=False)
    assert os.path.basename(path) in str(info.value)
    return str(info.value)


def _data_offset(path):
    """File offset of the middle byte of the largest array's (contiguous) data."""
    with h5py.File(path, "r") as f:
        found = []
        f.visititems(lambda name, obj: found.append((obj.id.get_storage_size(), obj.id.get_offset()))
                     if isinstance(obj, h5py.Dataset) else None)
    size, offset = max(found)
    return offset + size // 2


def test_truncated_checkpoints_are_refused(checkpoint, tmp_path):
    src, _ = checkpoint
    size = os.path.getsize(src)
    for frac in (0.0, 0.01, 0.3, 0.5, 0.9, 0.999):
        path = _copy(src, tmp_path / f"trunc-{frac}.h5")
        with open(path, "r+b") as fh:
            fh.truncate(int(size * frac))
        _refused(path, "checkpoint")


def test_bit_flipped_checkpoints_are_refused(checkpoint, tmp_path):
    src, original = checkpoint
    size = os.path.getsize(src)

    def flip(pos, name):
        path = _copy(src, tmp_path / name)
        with open(path, "r+b") as fh:
            fh.seek(pos)
            byte = fh.read(1)[0]
            fh.seek(pos)
            fh.write(bytes([byte ^ 0x10]))
        return path

    # The whole file is hashed (user block), so a flip anywhere is refused — also in bytes
    # HDF5 itself never reads (padding, unused B-tree slots) and in the user block.
    assert "data.h5" in _refused(flip(_data_offset(src), "data.h5"), "fails its file checksum")
    rng = random.Random(7)
    positions = [size // 2, 0, 100, 511, size - 1] + [rng.randrange(size) for _ in range(40)] + \
        list(range(0, 2048, 97))
    for i, pos in enumerate(positions):
        _refused(flip(pos, f"flip-{i}.h5"), "checksum")


def test_foreign_and_tampered_files_are_refused(checkpoint, tmp_path):
    src, _ = checkpoint
    # An HDF5 file that is not a checkpoint (a volumes file).
    vols = str(tmp_path / "volumes.h5")
    with h5py.File(vols, "w") as f:
        f["volumes"] = np.zeros((2,) + CFG.input_shape, np.float32)
    _refused(vols, "not a wrn3d_tl checkpoint")
    # Not HDF5 at all; empty.
    txt = tmp_path / "notes.h5"
    txt.write_text("hello\n")
    _refused(str(txt), "not a readable HDF5")
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    _refused(str(empty), "not a readable HDF5")
    # A checkpoint whose weights were edited through h5py (valid HDF5, wrong checksum).
    edited = _copy(src, tmp_path / "edited.h5")
    with h5py.File(edited, "r+") as f:
        f["weights/head/logits/biases"][0] += 1.0
    _refused(edited, "fails its file checksum")
    # ... or whose checksum attribute was removed.
    nosum = _copy(src, tmp_path / "nosum.h5")
    with h5py.File(nosum, "r+") as f:
        del f.attrs["checksum"]
    _refused(nosum, "fails its file checksum")
    with pytest.raises(FileNotFoundError, match="absent.h5"):
        Trainer.restore(str(tmp_path / "absent.h5"), verbose=False)


def test_load_of_a_damaged_checkpoint_leaves_the_trainer_unchanged(checkpoint, tmp_path):
    src, _ = checkpoint
    trainer = Trainer(build_wrn(CFG), lr=0.05, verbose=False)
    trainer.train_step(*_batch(9))
    before = _state(trainer)
    path = _copy(src, tmp_path / "bad.h5")
    with open(path, "r+b") as fh:
        fh.seek(_data_offset(path))
        fh.write(b"\xff\x00\xff\x00")
    with pytest.raises(CheckpointError, match="bad.h5"):
        trainer.load(path)
    _assert_same_state(before, _state(trainer))
    assert trainer.normalization is None


# ====================================================================== bad inputs

@pytest.fixture
def ck_trainer(tmp_path):
    """A trainer that checkpoints every step, after two good steps."""
    folder = str(tmp_path / "ck")
    tf.random.set_seed(0)
    trainer = Trainer(build_wrn(CFG), lr=0.05, normalization=NORM, checkpoint_dir=folder, checkpoint_every=1,
                      verbose=False)
    for s in range(2):
        trainer.train_step(*_batch(s))
    return trainer, folder


def _bad_batches():
    x, y = _batch(3)
    nan = x.copy()
    nan[3, 1, 2, 3, 0] = np.nan
    inf = x.copy()
    inf[0, 0, 0, 0, 2] = -np.inf
    return {
        "rank: one volume without batch axis": (x[0], y[:1], r"x must have shape \(batch,\)"),
        "rank: channels dropped": (x[..., 0], y, r"x must have shape \(batch,\) \+ \(4, 16, 16, 3\)"),
        "spatial shape": (x[:, :, :8], y, r"got \(8, 4, 8, 16, 3\)"),
        "depth axis": (x[:, :2], y, r"got \(8, 2, 16, 16, 3\)"),
        "channels": (x[..., :1], y, r"got \(8, 4, 16, 16, 1\)"),
        "label out of range": (x, np.where(np.arange(8) == 5, CFG.num_classes, y), r"labels must be in \[0, 5\)"),
        "negative label": (x, np.where(np.arange(8) == 2, -1, y), r"labels must be in \[0, 5\), got values from -1"),
        "float labels": (x, y.astype(np.float32), r"integer class labels"),
        "label count": (x, y[:5], r"y must have shape \(8,\)"),
        "empty batch": (x[:0], y[:0], r"the batch is empty"),
        "NaN in x": (nan, y, r"x contains NaN or Inf"),
        "Inf in x": (inf, y, r"x contains NaN or Inf"),
        "strings": (np.full((8,) + CFG.input_shape, "a"), y, r"x must be numeric"),
    }


BAD = _bad_batches()
# evaluate() checks the whole arrays first (rank, then len(x) == len(y)) and says "data is empty".
EVAL_PATTERN = {"rank: one volume without batch axis": r"x must have shape \(batch,\) \+ \(4, 16, 16, 3\), got \(4, 16, 16, 3\)",
                "empty batch": "data is empty"}


@pytest.fixture(scope="module")
def shared_ck_trainer(tmp_path_factory):
    """ONE trainer like ``ck_trainer`` for all the bad-batch cases (compiling a trainer per case
    was most of their time): each case asserts that its refusal changed nothing, and starts
    from the state saved here (``trainer.load``), so the cases stay independent."""
    folder = str(tmp_path_factory.mktemp("shared") / "ck")
    tf.random.set_seed(0)
    trainer = Trainer(build_wrn(CFG), lr=0.05, normalization=NORM, checkpoint_dir=folder, checkpoint_every=1,
                      verbose=False)
    for s in range(2):
        trainer.train_step(*_batch(s))
    start = trainer.save(os.path.join(os.path.dirname(folder), "start.h5"))
    return trainer, folder, start


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_batches_raise_and_change_nothing(shared_ck_trainer, case):
    trainer, folder, start = shared_ck_trainer
    trainer.load(start)
    x, y, pattern = BAD[case]
    state, files = _state(trainer), _digests(folder)
    with pytest.raises(ValueError, match=r"train_step: .*" + pattern):
        trainer.train_step(x, y)
    with pytest.raises(ValueError, match=r"evaluate: .*" + EVAL_PATTERN.get(case, pattern)):
        trainer.evaluate((x, y))
    _assert_same_state(state, _state(trainer))
    assert _digests(folder) == files, "checkpoint files changed"


def test_non_finite_step_is_refused_and_changes_nothing(ck_trainer):
    trainer, folder = ck_trainer
    x, y = _batch(4)
    state, files = _state(trainer), _digests(folder)
    with pytest.raises(FloatingPointError, match="weights were not updated"):
        trainer.train_step(np.full_like(x, 3e38), y)  # finite input, overflowing activations
    _assert_same_state(state, _state(trainer))
    assert _digests(folder) == files


def test_float64_and_integer_batches_are_converted_to_float32(tmp_path):
    tf.random.set_seed(1)
    trainer = Trainer(build_wrn(CFG), lr=0.05, verbose=False)
    start = trainer.save(str(tmp_path / "start.h5"))
    x, y = _batch(5)
    ints = np.round(x * 40 + 100).clip(0, 255).astype(np.uint8)
    for a, b in ((x.astype(np.float64), x), (ints, ints.astype(np.float32)),
                 (ints.astype(np.int64), ints.astype(np.float32))):
        # as JSON: an absent class's AUC is NaN, which is unequal to itself
        assert json.dumps(trainer.evaluate((a, y))) == json.dumps(trainer.evaluate((b, y)))
        trainer.load(start)
        m_a, w_a = trainer.train_step(a, y.astype(np.int32)), _state(trainer)
        trainer.load(start)
        m_b, w_b = trainer.train_step(b, y), _state(trainer)
        assert m_a["loss"] == pytest.approx(m_b["loss"], abs=1e-6)
        for k in w_a:
            np.testing.assert_allclose(w_a[k], w_b[k], atol=1e-6, err_msg=k)


def test_bad_volumes_for_predict_and_cli_change_nothing(ck_trainer, tmp_path, capsys):
    trainer, folder = ck_trainer
    ckpt = CheckpointManager(folder).latest()
    files, state = _digests(folder), _state(trainer)
    pred = Predictor(ckpt)
    weights = [v.numpy().copy() for v in pred.model.all_weights]
    x, _ = _batch(6, n=3)
    nan = x.copy()
    nan[1, 0, 0, 0, 0] = np.nan
    bad = {"rank": x[..., 0], "spatial": x[:, :, :, :4], "channels": np.concatenate([x, x[..., :1]], -1),
           "empty": x[:0], "nan": nan, "overflow": np.full(x.shape, 1e200), "bool": x > 0,
           "huge": np.full(x.shape, 3e38, np.float32)}
    for name, volumes in bad.items():
        with pytest.raises(ValueError, match="volumes"):
            predict(pred, volumes)
        with pytest.raises(ValueError):
            predict(trainer, volumes)
        if name not in ("rank", "empty", "nan"):  # the CLI reports the same check: three kinds show it
            continue
        path = str(tmp_path / f"{name}.npy")
        np.save(path, volumes)
        out = str(tmp_path / "out.csv")
        capsys.readouterr()
        assert predict_main(["--checkpoint", ckpt, "--npy", path, "--out", out]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("wrn3d-predict: error: --npy ") and err.count("\n") == 1, err
        assert not os.path.exists(out)
    # Documented conversions work: float64 and int volumes give the float32 answer.
    ref = predict(pred, x)["logits"]
    np.testing.assert_allclose(predict(pred, x.astype(np.float64))["logits"], ref, atol=1e-5, rtol=0)
    for v, w in zip(pred.model.all_weights, weights):
        np.testing.assert_array_equal(v.numpy(), w)
    _assert_same_state(state, _state(trainer))
    assert _digests(folder) == files


# ============================================================ WRNConfig properties

def _strides(rank):
    per_axis = st.tuples(*[st.integers(1, 3)] * rank)
    return st.tuples(*[st.one_of(st.integers(1, 2), per_axis)] * 3)


@st.composite
def valid_configs(draw):
    rank = draw(st.sampled_from([2, 3]))
    spatial = tuple(draw(st.integers(1, 6)) for _ in range(rank))
    shape = spatial + (draw(st.integers(1, 3)),)
    return WRNConfig(depth=draw(st.sampled_from([10, 16])), widen_factor=draw(st.integers(1, 2)),
                     num_classes=draw(st.integers(2, 7)), input_shape=shape,
                     dropout=draw(st.sampled_from([0.0, draw(st.floats(0.0, 0.9))])),
                     group_strides=draw(_strides(rank)),
                     bn_decay=draw(st.floats(0.0, 0.999)), bn_epsilon=draw(st.floats(1e-6, 1e-2)))


@settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=valid_configs(), batch=st.integers(1, 3))
def test_valid_configs_build_and_run(cfg, batch):
    model = build_wrn(cfg)
    x = tf.random.normal((batch,) + cfg.input_shape, seed=0)
    for is_train in (False, True):
        y = model(x, is_train=is_train)
        assert tuple(y.shape) == (batch, cfg.num_classes) and y.dtype == tf.float32
        assert bool(tf.reduce_all(tf.math.is_finite(y)))
    assert count_params(model) == sum(row[3] for row in group_shapes(cfg))
    assert WRNConfig.from_dict(cfg.to_dict()) == cfg


_BASE = dict(depth=10, widen_factor=1, num_classes=3, input_shape=(2, 8, 8, 1))
_not_int = st.one_of(st.floats(allow_nan=True), st.booleans(), st.text(max_size=3), st.none())
_not_prob = st.one_of(st.floats().filter(lambda v: not 0.0 <= v < 1.0), st.booleans(), st.text(max_size=3))

INVALID = st.one_of(
    st.tuples(st.just("depth"), st.one_of(st.integers(-20, 100).filter(lambda d: d < 10 or (d - 4) % 6),
                                          _not_int, st.just(16.0))),
    st.tuples(st.just("widen_factor"), st.one_of(st.integers(-5, 0), _not_int, st.just(2.0))),
    st.tuples(st.just("num_classes"), st.one_of(st.integers(-5, 1), _not_int)),
    st.tuples(st.just("input_shape"), st.one_of(
        st.lists(st.integers(1, 8), max_size=6).filter(lambda s: len(s) not in (3, 4)).map(tuple),
        st.tuples(st.integers(-3, 0), st.integers(1, 8), st.integers(1, 8), st.integers(1, 3)),
        st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(-3, 0)),
        st.just((2.0, 8, 8, 1)), st.just("2x8x8x1"), st.none())),
    st.tuples(st.just("dropout"), _not_prob),
    st.tuples(st.just("group_strides"), st.one_of(
        st.lists(st.integers(1, 2), max_size=5).filter(lambda s: len(s) != 3).map(tuple),
        st.tuples(st.integers(-2, 0), st.just(2), st.just(2)),
        st.just((1, (2, 2), 2)),  # a 3D config needs 3 strides per axis
        st.just((1, (2, 2, 2, 2), 2)), st.just((1, 2.0, 2)), st.just((1, True, 2)), st.just("122"))),
    st.tuples(st.just("bn_decay"), _not_prob),
    st.tuples(st.just("bn_epsilon"), st.one_of(st.floats(max_value=0.0), st.just(float("nan")), st.text(max_size=2))),
    st.tuples(st.just("sync_bn"), st.one_of(st.integers(0, 1), st.text(max_size=2), st.none())),
)


@settings(max_examples=120, deadline=None, database=None)
@given(bad=INVALID)
def test_invalid_config_values_name_the_field(bad):
    field, value = bad
    with pytest.raises(ValueError, match=rf"^WRNConfig\.{field} must be "):
        WRNConfig(**{**_BASE, field: value})
