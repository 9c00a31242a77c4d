"""The devices a job trains on and what they offer: kind, memory, and for GPUs their model,
compute capability and TensorFlow's CUDA/cuDNN build.

``--batch-size auto`` budgets the memory of the devices returned by ``training_devices``;
``benchmarks/gpu_check.py`` prints ``gpu_report()``.
"""

import os

import tensorflow as tf

__all__ = ["training_devices", "device_kind", "device_memory_bytes", "gpu_report"]


def training_devices(strategy=None):
    """Names of the local devices a job's replicas compute on: ``strategy``'s (its
    ``worker_devices``), else the one TensorFlow places ops on by default (the first GPU
    when it sees one, else the CPU)."""
    if strategy is not None:
        return list(strategy.extended.worker_devices)
    gpus = tf.config.list_logical_devices("GPU")
    return [(gpus or tf.config.list_logical_devices("CPU"))[0].name]


def device_kind(device):
    """``"GPU"`` or ``"CPU"`` (or another TensorFlow device type) of a device name such as
    ``"/job:localhost/replica:0/task:0/device:GPU:1"`` or ``"/GPU:0"``."""
    kind = tf.DeviceSpec.from_string(device).device_type
    if not kind:
        raise ValueError(f"device: {device!r} names no device type (expected e.g. '/GPU:0' or '/CPU:0')")
    return kind.upper()


def device_memory_bytes(device):
    """Bytes a device offers: for a GPU, the limit of TensorFlow's allocator on it (the
    device's free memory when TensorFlow started, or a configured logical device's limit);
    for a CPU, this machine's RAM (its logical CPUs share it)."""
    kind = device_kind(device)
    if kind == "CPU":
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    index = tf.DeviceSpec.from_string(device).device_index or 0
    for d in _local_devices():
        spec = tf.DeviceSpec.from_string(d.name)
        if spec.device_type == kind and (spec.device_index or 0) == index:
            return int(d.memory_limit)
    raise ValueError(f"device: TensorFlow sees no {kind}:{index} (asked for {device!r})")


def _local_devices():
    # TensorFlow's public API reports a GPU's current and peak use (get_memory_info), not
    # its size; the allocator's limit is in the device attributes.
    from tensorflow.python.client import device_lib

    return device_lib.list_local_devices()


def gpu_report():
    """What TensorFlow sees of the GPUs: ``{"gpus": [{"device", "name", "compute_capability",
    "memory_bytes"}, ...], "cuda": version, "cudnn": version}`` (``gpus`` empty when none is
    visible; the versions are those TensorFlow was built with)."""
    build = tf.sysconfig.get_build_info()
    gpus = []
    for i, gpu in enumerate(tf.config.list_physical_devices("GPU")):
        details = tf.config.experimental.get_device_details(gpu)
        cc = details.get("compute_capability")
        gpus.append({"device": f"/device:GPU:{i}", "name": details.get("device_name", gpu.name),
                     "compute_capability": ".".join(map(str, cc)) if cc else None,
                     "memory_bytes": device_memory_bytes(f"/device:GPU:{i}")})
    return {"gpus": gpus, "cuda": build.get("cuda_version"), "cudnn": build.get("cudnn_version")}
