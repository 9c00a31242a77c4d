"""Where ``Trainer.train_step``'s batches come from when it is called without arguments.

``train_data`` (a ``tf.data.Dataset`` of ``(x, y)`` batches, NDHWC/NHWC ``x``, integer
``y``; or an ``(x, y)`` pair of arrays, shuffled and batched here) is iterated epoch after
epoch. Under a strategy of several replicas a wrn3d_tl pipeline is split: each replica reads
only its own share of every global batch (``wrn3d_tl.data.shards``); other data are read
whole by every worker, with one warning, and each replica slices its part in the step.
"""

import warnings

import tensorflow as tf

from wrn3d_tl.data import data_errors
from wrn3d_tl.data.shards import Share, input_share, share_problem
from wrn3d_tl.validate import check_int

__all__ = ["Feed"]


class Feed:
    """The training batches of one trainer: ``strategy`` (its replicas), ``checks`` (a
    ``wrn3d_tl.batches.BatchChecks``, for a split pipeline's element spec), ``seed`` (the
    arrays' shuffle), ``shard_input`` (split wrn3d_tl pipelines over the replicas)."""

    def __init__(self, strategy, checks, seed, shard_input):
        self.strategy, self.checks, self.seed, self.shard_input = strategy, checks, seed, bool(shard_input)
        self.data = self._iterator = self._split = None
        self._read_whole = False

    @staticmethod
    def as_dataset(data, batch_size, seed):
        """``(dataset or None, batch_size)``: a Dataset as it is; an ``(x, y)`` pair of arrays
        shuffled (``seed``, anew every epoch) into ``batch_size`` batches (the last partial
        one dropped), ``batch_size`` checked."""
        if isinstance(data, (tuple, list)):
            if len(data) != 2:
                raise ValueError(f"train_data must be a tf.data.Dataset or an (x, y) pair, got {len(data)} items")
            batch_size = check_int(batch_size, "batch_size (train_data is arrays)")
            x, y = data
            if len(x) != len(y):
                raise ValueError(f"train_data: x has {len(x)} samples but y has {len(y)}")
            data = (tf.data.Dataset.from_tensor_slices((x, y))
                    .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
                    .batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
        elif data is not None and not isinstance(data, tf.data.Dataset):
            raise TypeError(f"train_data must be a tf.data.Dataset, an (x, y) pair or None, got {type(data).__name__}")
        return data, batch_size

    def use(self, dataset):
        """Read ``dataset`` (a Dataset or None) from its start on the next batch."""
        self.data, self._iterator, self._split, self._read_whole = dataset, None, None, False

    @property
    def split(self):
        """True when each replica reads only its own share of every batch."""
        return self._split is not None

    def next_batch(self):
        """``(x, y, whole)``: the next batch; ``whole`` is False when it comes as per-replica
        shares of a split pipeline. A finished epoch starts the next one."""
        if self.data is None:
            raise ValueError("train_step() without arguments needs train_data; pass x and y or set train_data")
        for _ in range(2):
            if self._iterator is None:
                self._iterator = iter(self._split_data() or self.data)
            try:
                with data_errors():
                    batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                continue
            return (*batch, self._split is None)
        raise ValueError("train_data yields no batches")

    def _split_data(self):
        """The distributed dataset of the per-worker shares, created once per dataset (its
        passes continue the epochs); None when it is read whole (decided, and warned about,
        once per dataset)."""
        replicas = self.strategy.num_replicas_in_sync
        if self._split is None and not self._read_whole and replicas > 1 and self.shard_input:
            pipeline = getattr(self.data, "wrn3d_pipeline", None)
            if pipeline is not None and pipeline.batch_size % replicas:  # read whole, it would fail at once
                raise ValueError(f"train_step: the global batch of {pipeline.batch_size} does not divide evenly "
                                 f"over {replicas} replicas")
            problem = share_problem(self.data, Share.of_strategy(self.strategy))
            if problem:
                self._read_whole = True
                warnings.warn(f"wrn3d_tl: train_data is read whole by every worker, each replica keeping its "
                              f"slice of the global batch: {problem}", UserWarning, stacklevel=4)
                return None
            spec = self.data.element_spec
            self.checks.spec(spec[0].shape, spec[0].dtype, spec[1].dtype)
            data = self.data
            self._split = self.strategy.distribute_datasets_from_function(lambda ctx: input_share(data, Share.of(ctx)))
        return self._split
