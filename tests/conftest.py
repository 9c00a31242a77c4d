"""Shared test set-up: quiet TensorFlow, two logical CPUs for tf.distribute tests."""

import gc
import importlib.util
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import wrn3d_tl  # noqa: E402,F401  (before TensorFlow: oneDNN on where TensorFlow leaves it off)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Logical devices can only be configured before TensorFlow's runtime starts, so this
# happens at import, once for the whole session; single-device code still runs on CPU:0.
_cpus = tf.config.list_physical_devices("CPU")
# WRN3D_TEST_INTRA_OP_THREADS=N: each pytest worker's kernels use N threads (make test runs one
# worker per core with 1), so workers do not oversubscribe the cores; subprocesses the tests
# start keep TensorFlow's defaults.
if os.environ.get("WRN3D_TEST_INTRA_OP_THREADS"):
    tf.config.threading.set_intra_op_parallelism_threads(int(os.environ["WRN3D_TEST_INTRA_OP_THREADS"]))
try:
    tf.config.set_logical_device_configuration(_cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
except RuntimeError:  # runtime already initialised by another plugin
    pass


# tf.data's autotuning is off in the test processes (WRN3D_TEST_AUTOTUNE=1 keeps it on). With it
# on, every iterator runs an optimisation thread that sleeps up to 60 s between passes, and in
# TensorFlow 2.21 dropping an iterator sometimes waits for that sleep to end: the waits stalled
# Python's garbage collections for 15-100 s, 50-180 s per pytest worker (py-spy/gdb:
# RootDataset::Iterator::~Iterator joining the Model::OptimizeLoop thread). Autotuning only
# chooses parallelism and buffer sizes, never the elements or their order
# (test_data.py::test_autotuning_changes_no_element checks it), so results are the same.
_autotuned_iterators = tf.data.Dataset._apply_debug_options  # every iterator is made through it


def _without_autotune(dataset):
    options = tf.data.Options()
    options.autotune.enabled = False
    return _autotuned_iterators(dataset.with_options(options))


def autotune(on):
    """Make tf.data iterators with autotuning on (True) or off (False, the test default)."""
    tf.data.Dataset._apply_debug_options = _autotuned_iterators if on else _without_autotune


_AUTOTUNE = os.environ.get("WRN3D_TEST_AUTOTUNE") == "1"
autotune(_AUTOTUNE)


@pytest.fixture
def set_autotune():
    """``set_autotune(on)`` for one test (see ``autotune``); the session's setting comes back after it."""
    yield autotune
    autotune(_AUTOTUNE)


_STRATEGY = {}  # the session's MirroredStrategy objects, by their devices


def session_strategy(devices):
    """The session's MirroredStrategy over ``devices``, made once. Two strategies in one
    process start from the same collective keys and TensorFlow then mixes up their
    all-reduces (the second one's steps are cancelled), so each device set gets its own key
    range, as TensorFlow's own tests do it (``_collective_key_base``)."""
    devices = tuple(devices)
    if devices not in _STRATEGY:
        tf.distribute.MirroredStrategy._collective_key_base = 10000 * len(_STRATEGY)
        try:
            _STRATEGY[devices] = tf.distribute.MirroredStrategy(list(devices))
        finally:
            tf.distribute.MirroredStrategy._collective_key_base = 0
    return _STRATEGY[devices]


@pytest.fixture(scope="session")
def mirrored_over():
    """``mirrored_over(devices)``: the session's MirroredStrategy over ``devices`` (see
    ``session_strategy``)."""
    return session_strategy


@pytest.fixture(scope="session")
def two_cpu_strategy():
    """The session's MirroredStrategy over two logical CPUs (see ``session_strategy``)."""
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(devices) < 2:
        pytest.skip("two logical CPU devices could not be configured")
    return session_strategy(devices[:2])


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def load_example():
    """``load_example("cifar_wide_resnet_tl")``: import examples/<name>.py as a module (the
    scripts are not a package; each call gives a fresh module)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def load(name):
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, "examples", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("bench_train")``: import benchmarks/<name>.py as a fresh module. For
    the session, benchmarks/ is on sys.path (the scripts import each other) and each module
    is registered in sys.modules (their dataclasses look themselves up there)."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    sys.path.insert(0, folder)
    loaded = []

    def load(name):
        spec = importlib.util.spec_from_file_location(f"_benchmark_{name}_{len(loaded)}",
                                                      os.path.join(folder, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        loaded.append(spec.name)
        spec.loader.exec_module(module)
        return module

    yield load
    sys.path.remove(folder)
    for name in loaded:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def cifar_script(load_example):
    """examples/cifar_wide_resnet_tl.py as a module (main, parse_args, make_trainer)."""
    return load_example("cifar_wide_resnet_tl")


# WRN3D_TEST_GC_LOG=PREFIX: each test process writes PREFIX.<pid> at exit: the time Python's full
# garbage collections took and every one over 1 s with the test it interrupted (tests/_gc_log.py).
_GC_LOG = None
if os.environ.get("WRN3D_TEST_GC_LOG"):
    from _gc_log import GCLog

    _GC_LOG = GCLog(os.environ["WRN3D_TEST_GC_LOG"], os.environ.get("WRN3D_TEST_GC_STACKS"))

# The ~400k objects of TensorFlow's and the libraries' imports live as long as the process: out
# of the full collections' scans, which then look only at what the tests made.
gc.freeze()


def pytest_runtest_setup(item):
    if _GC_LOG is not None:
        _GC_LOG.test = item.nodeid
