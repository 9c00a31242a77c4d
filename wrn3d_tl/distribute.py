"""Creating tf.distribute strategies for the Trainer: several local devices
(MirroredStrategy) or several machines (MultiWorkerMirroredStrategy over TF_CONFIG).

Call ``make_strategy`` at program start, before any other TensorFlow work: logical CPU
devices and the multi-worker runtime can only be set up before TensorFlow initialises.
"""

import json
import os

import tensorflow as tf

from wrn3d_tl.validate import check_int

__all__ = ["make_strategy", "WORKER_LOST_ERRORS", "MAYBE_WORKER_LOST_ERRORS", "worker_failure_message"]

# What a collective raises when a peer worker dies or stops answering.
WORKER_LOST_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError)
# Raised by a collective cancelled under a lost peer, but just as well by failures that
# have nothing to do with other workers (a kernel error, a bad input): never reported as
# a certain loss.
MAYBE_WORKER_LOST_ERRORS = (tf.errors.CancelledError, tf.errors.InternalError)


def worker_failure_message(exc, step):
    """The error line a multi-worker run prints when step ``step`` fails with ``exc``:
    a certain loss of contact for ``WORKER_LOST_ERRORS``, a possible one (with the
    original error, in full) for ``MAYBE_WORKER_LOST_ERRORS``; None for anything else."""
    first = " ".join(str(exc).split())
    if isinstance(exc, WORKER_LOST_ERRORS):
        return (f"[wrn3d_tl] ERROR: lost contact with another worker at step {step} "
                f"({type(exc).__name__}: {first[:200]}). Restart every worker with --resume to continue from "
                "the last checkpoint.")
    if isinstance(exc, MAYBE_WORKER_LOST_ERRORS):
        return (f"[wrn3d_tl] ERROR at step {step}: {type(exc).__name__}: {first}\n"
                "[wrn3d_tl] This may mean a lost contact with another worker (then restart every worker with "
                "--resume to continue from the last checkpoint), or a failure of its own: see the error above.")
    return None


def make_strategy(kind="none", cpu_replicas=None, timeout_seconds=None):
    """Return a strategy, or None for ``kind="none"``.

    Args:
        kind: "none"; "mirrored" (every local GPU, or ``cpu_replicas`` logical CPU
            devices when given — for testing on CPU-only machines); "multiworker"
            (reads the cluster and this worker's role from the ``TF_CONFIG`` variable).
        cpu_replicas: int >= 1 or None; only with "mirrored".
        timeout_seconds: with "multiworker", abort a collective that waits longer than
            this (a bound on how long a lost worker can stall the others); None keeps
            TensorFlow's default (peer health checks only).
    """
    if kind in (None, "none"):
        return None
    if kind == "mirrored":
        if cpu_replicas is None:
            return tf.distribute.MirroredStrategy()
        cpu_replicas = check_int(cpu_replicas, "cpu_replicas")
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
        except RuntimeError as e:
            raise RuntimeError("cpu_replicas: logical CPU devices must be set up before TensorFlow initialises; "
                               "call make_strategy first thing in the program") from e
        return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(cpu_replicas)])
    if kind == "multiworker":
        if cpu_replicas is not None:
            raise ValueError("cpu_replicas applies to kind='mirrored' only")
        raw = os.environ.get("TF_CONFIG")
        if not raw:
            raise ValueError("kind='multiworker' needs the TF_CONFIG environment variable "
                             '(e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, '
                             '"task": {"type": "worker", "index": 0}})')
        try:
            cfg = json.loads(raw)
            cfg["cluster"], cfg["task"]["type"], cfg["task"]["index"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"TF_CONFIG is not valid: expected JSON with 'cluster' and 'task' "
                             f"{{'type', 'index'}}, got {raw!r}") from e
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_seconds)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    raise ValueError(f"kind must be 'none', 'mirrored' or 'multiworker', got {kind!r}")
