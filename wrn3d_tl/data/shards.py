"""Where a pipeline starts and which part of every global batch it makes.

Every ``wrn3d_tl.data`` pipeline (``make_dataset``, ``hdf5_dataset``, ``nifti_dataset``)
is tagged with the :class:`Pipeline` that built it (``dataset.wrn3d_pipeline``), so it can
be rebuilt

* **positioned** at a later global batch (:func:`starting_at`, what a resumed run needs):
  whole epochs are skipped by arithmetic, not by producing their batches;
* **as one input pipeline's share** (:func:`input_share`, what ``Trainer`` hands to
  ``strategy.distribute_datasets_from_function``): a worker reads, decodes and augments
  only the samples of its own replicas.

The global batches of a split pipeline, read in replica order, are

* for ``make_dataset`` and ``nifti_dataset``: exactly those of the one-process pipeline
  (same samples, same order, same augmentation), whatever the number of workers: input
  pipeline ``w`` of ``W`` keeps the ``w``-th contiguous ``B / W`` samples of every global
  batch of ``B`` from the shared, seeded sample order;
* for ``hdf5_dataset``: with one input pipeline (one process, any number of replicas)
  exactly the one-process batches; with ``W > 1`` workers, worker ``w`` reads the blocks
  ``w, w + W, ...`` of each epoch's (seeded) block order, so workers read disjoint blocks
  and global batch ``k`` is the workers' ``k``-th local batches side by side. Each sample's
  augmentation is the same as in one process (it is seeded by sample and epoch), and the
  sequence is a deterministic function of the seed and ``W``, but not the one-process one.
  When the blocks do not split evenly, workers get unequal parts of an epoch and their
  epochs drift apart: a global batch can then hold samples of two epochs (even one sample
  twice). Resuming with another number of workers continues another sequence.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import tensorflow as tf

from wrn3d_tl.validate import check_int

__all__ = ["Share", "Pipeline", "starting_at", "input_share", "share_problem"]


@dataclasses.dataclass(frozen=True)
class Share:
    """The part of every global batch one input pipeline makes.

    ``index``: this input pipeline (worker) in ``[0, count)``; ``count``: the input
    pipelines (workers); ``replicas``: the replicas it feeds, which take its per-replica
    batches in turn (``tf.distribute`` deals them round-robin).
    """

    index: int = 0
    count: int = 1
    replicas: int = 1

    @property
    def total_replicas(self) -> int:
        return self.count * self.replicas

    @classmethod
    def of(cls, input_context) -> "Share":
        """The share of a ``tf.distribute.InputContext``."""
        return cls._split(input_context.input_pipeline_id, input_context.num_input_pipelines,
                          input_context.num_replicas_in_sync)

    @classmethod
    def of_strategy(cls, strategy) -> "Share":
        """The first worker's share under ``strategy`` (one input pipeline per worker, fed to
        its local devices): what every worker's share looks like but for its index."""
        local = len(strategy.extended.worker_devices)
        return cls._split(0, strategy.num_replicas_in_sync // local, strategy.num_replicas_in_sync)

    @classmethod
    def _split(cls, index, count, replicas_in_sync):
        return cls(index, count, replicas_in_sync // count)


ALL = Share()


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """How a tagged pipeline is built again (``dataset.wrn3d_pipeline``).

    ``build(pipeline) -> tf.data.Dataset`` makes its batches from global batch
    ``pipeline.start`` on, ``pipeline.share``'s part only (per-replica batches of
    ``batch_size / share.total_replicas``); ``tags`` are the attributes every build carries
    (``wrn3d_normalization``, ...). ``n``: samples per epoch; ``batch_size``: the global
    batch; ``repeat``/``drop_remainder``: as the pipeline was asked; ``blocks``: for
    ``hdf5_dataset``, the number of blocks it reads, which workers split between them
    (disjoint blocks, not the sample-exact rule); 0 for the sample-exact pipelines.
    """

    build: object
    n: int
    batch_size: int
    repeat: bool
    drop_remainder: bool
    tags: dict
    start: int = 0
    share: Share = ALL
    blocks: int = 0

    def dataset(self, start=None, share=None) -> tf.data.Dataset:
        """The tagged dataset of this pipeline from global batch ``start`` for ``share``."""
        p = dataclasses.replace(self, start=self.start if start is None else start,
                                share=self.share if share is None else share)
        ds = p.build(p)
        for name, value in p.tags.items():
            setattr(ds, name, value)
        ds.wrn3d_pipeline = p
        return ds

    @property
    def replica_batch(self) -> int:
        """Samples per batch of this build (the global batch over the share's replicas)."""
        return self.batch_size // self.share.total_replicas

    @property
    def samples_per_pass(self) -> int:
        """Samples of one epoch that reach a batch (a dropped partial batch's are never read)."""
        if self.drop_remainder and not self.repeat:
            return (self.n // self.batch_size) * self.batch_size
        return self.n

    @property
    def full_batches(self) -> bool:
        """Whether every global batch holds ``batch_size`` samples."""
        return self.repeat or self.drop_remainder or self.n % self.batch_size == 0

    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size if self.drop_remainder else -(-self.n // self.batch_size)

    def cardinality(self) -> int:
        """Batches of one iteration of the built dataset (``tf.data`` constants when endless or
        unknown: a dataset positioned inside an epoch makes a short first pass)."""
        if self.repeat:
            return tf.data.INFINITE_CARDINALITY
        if self.start % self.batches_per_epoch():
            return tf.data.UNKNOWN_CARDINALITY
        if self.share.total_replicas == 1:
            return self.batches_per_epoch()
        return self.batches_per_epoch() * self.share.replicas  # full batches: checked by share_problem


def starting_at(dataset, batch: int):
    """``dataset`` positioned ``batch`` global batches later, as an uninterrupted run reading
    it would be there: for a resumed run at step ``batch``.

    For a tagged ``wrn3d_tl.data`` pipeline the result is the same pipeline rebuilt to start
    there (still tagged and splittable): skipped epochs cost no work, and of the partly read
    epoch nothing before the position is decoded (``hdf5_dataset`` reads the one shuffle
    window the position falls in, which it shuffles whole). With ``repeat=False`` the
    first pass over the result finishes the partly read epoch and later passes are the
    following epochs. Any other dataset gets ``dataset.skip(batch)``, which produces and
    drops every skipped batch.
    """
    batch = check_int(batch, "starting_at: batch", 0)
    pipeline = getattr(dataset, "wrn3d_pipeline", None)
    if pipeline is None:
        return dataset.skip(int(batch))
    return pipeline.dataset(start=pipeline.start + int(batch))


def share_problem(dataset, share: Share):
    """Why ``dataset`` cannot be split into ``share`` (a sentence), or None when it can."""
    pipeline = getattr(dataset, "wrn3d_pipeline", None)
    if pipeline is None:
        return "it is not a wrn3d_tl.data pipeline (make_dataset, hdf5_dataset, nifti_dataset)"
    if pipeline.share != ALL:
        return "it is already one input pipeline's share"
    if pipeline.batch_size % share.total_replicas:
        return (f"its batch of {pipeline.batch_size} does not divide evenly over {share.total_replicas} "
                "replicas")
    if not pipeline.full_batches:
        return (f"its last batch of each epoch is partial ({pipeline.n} samples, batch {pipeline.batch_size}); "
                "build it with drop_remainder=True or repeat=True")
    if pipeline.blocks and share.count > 1:
        if not pipeline.repeat:
            return "hdf5_dataset splits over several workers only as an endless stream (repeat=True)"
        if pipeline.blocks < share.count:
            return (f"its {pipeline.blocks} block(s) of the file cannot give each of {share.count} workers one; "
                    "pass hdf5_dataset a smaller block_size")
    return None


def input_share(dataset, share: Share) -> tf.data.Dataset:
    """The per-replica batches of ``share``'s part of a tagged pipeline (see the module's doc);
    ValueError with the reason when it cannot be split so."""
    problem = share_problem(dataset, share)
    if problem:
        raise ValueError(f"input_share: cannot split this dataset over {share.total_replicas} replicas: {problem}")
    return dataset.wrn3d_pipeline.dataset(share=share)


# ------------------------------------------------------------------ epochs and positions
class EpochCounter:
    """Hands out ``(epoch, skip)``: epoch numbers ``first, first + 1, ...``, one per pass over
    the data, and how many leading samples of that epoch's order to skip (``skip`` for the
    first pass, 0 after)."""

    def __init__(self, first=0, skip=0):
        self._next = int(first)
        self._skip = int(skip)
        self._lock = threading.Lock()

    def _take(self):
        with self._lock:
            epoch, skip = self._next, self._skip
            self._next, self._skip = epoch + 1, 0
            return epoch, skip

    def dataset(self, repeat: bool) -> tf.data.Dataset:
        """Scalar int64 ``(epoch, skip)`` pairs: one per iteration, or endless."""
        def gen():
            while True:
                epoch, skip = self._take()
                yield np.int64(epoch), np.int64(skip)
                if not repeat:
                    return
        spec = tf.TensorSpec([], tf.int64)
        return tf.data.Dataset.from_generator(gen, output_signature=(spec, spec))


def start_of(pipeline: Pipeline, per_worker_epoch=None):
    """``(first epoch, samples of it to skip)`` where global batch ``pipeline.start`` begins.

    ``per_worker_epoch(epoch)``: the samples of that epoch this worker reads, for streams
    whose share of an epoch varies (HDF5 blocks over several workers, ``repeat`` only); the
    position is then counted in the worker's own stream, else in the epoch's whole order."""
    b, n = pipeline.batch_size, pipeline.n
    if not pipeline.repeat:
        per = pipeline.batches_per_epoch()
        return pipeline.start // per, (pipeline.start % per) * b
    if per_worker_epoch is None:
        return divmod(pipeline.start * b, n)
    left, epoch = pipeline.start * b // pipeline.share.count, 0
    while left >= per_worker_epoch(epoch):
        left -= per_worker_epoch(epoch)
        epoch += 1
    return epoch, left


def epoch_positions(pipeline: Pipeline, order, epoch, skip):
    """The part of one epoch's sample ``order`` (int64 [n]) this pipeline makes: from
    position ``skip`` on, without the samples of a dropped partial batch, and only the
    share's contiguous part of every global batch (positions counted in the endless stream
    for ``repeat``, within the epoch otherwise)."""
    n, b, share = pipeline.n, pipeline.batch_size, pipeline.share
    p = tf.range(n, dtype=tf.int64)
    keep = (p >= skip) & (p < pipeline.samples_per_pass)
    if share.count > 1:
        g = epoch * n + p if pipeline.repeat else p
        keep &= (g % b) // (b // share.count) == share.index
    return tf.boolean_mask(order, keep)
