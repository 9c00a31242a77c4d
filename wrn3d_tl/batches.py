"""The checks a batch passes on its way into a training or evaluation step.

Shapes and dtypes are checked on the host, for free (no data is read); values (labels in
``[0, num_classes)``, finite inputs) inside the compiled step, which returns the counts with
its results, so that a step costs one host transfer. Either way a refused batch changes
nothing and the ValueError names the call (``train_step``, ``evaluate``).
"""

import tensorflow as tf

from wrn3d_tl.validate import check_batch_shape

__all__ = ["BatchChecks", "CHECKS", "combine"]

# The in-graph checks of a batch, in the order they are packed: non-finite values in x, labels
# out of range, the smallest and the largest label.
CHECKS = ("nonfinite", "bad_labels", "min_label", "max_label")


class BatchChecks:
    """The checks for batches of one network: ``(N,) + config.input_shape`` inputs (NDHWC for
    3D, NHWC for 2D) of any real dtype, ``(N,)`` integer labels in ``[0, num_classes)``."""

    def __init__(self, config):
        self.input_shape, self.num_classes = config.input_shape, config.num_classes

    def spec(self, shape, x_dtype, y_dtype, what="train_step"):
        """Check a batch's shape and dtypes as a dataset's element spec tells them."""
        if not (x_dtype.is_floating or x_dtype.is_integer):
            raise ValueError(f"{what}: x must be numeric, got dtype {x_dtype.name}")
        check_batch_shape(shape, self.input_shape, what)
        if not y_dtype.is_integer:
            raise ValueError(f"{what}: y must hold integer class labels, got dtype {y_dtype.name}")

    def tensors(self, x, y, what="train_step"):
        """One batch checked by what its shapes and dtypes tell, as (float32 x, int64 y)
        tensors: one compiled step serves every input dtype."""
        x, y = tf.convert_to_tensor(x), tf.convert_to_tensor(y)
        self.spec(x.shape, x.dtype, y.dtype, what)
        if y.shape.rank != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"{what}: y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{what}: the batch is empty (x has shape {tuple(x.shape)})")
        return tf.cast(x, tf.float32), tf.cast(y, tf.int64)

    def in_graph(self, x, y):
        """In the compiled step, one replica's batch: float64 ``CHECKS`` counts."""
        y = tf.cast(y, tf.int64)
        bad = tf.logical_or(y < 0, y >= self.num_classes)
        nonfinite = tf.logical_not(tf.math.is_finite(tf.cast(x, tf.float32)))
        counts = [tf.reduce_sum(tf.cast(nonfinite, tf.int64)), tf.reduce_sum(tf.cast(bad, tf.int64)),
                  tf.reduce_min(y), tf.reduce_max(y)]
        return tf.cast(tf.stack(counts), tf.float64)

    def model_inputs(self, x, y):
        """(float32 x, int64 labels clipped into range): a bad label cannot fail a kernel; the
        step it is in is refused through ``in_graph``'s counts."""
        return tf.cast(x, tf.float32), tf.clip_by_value(tf.cast(y, tf.int64), 0, self.num_classes - 1)

    def raise_for(self, out, what):
        """Raise the ValueError of a batch whose values ``in_graph`` refused; ``out`` maps the
        ``CHECKS`` names to the step's results."""
        if out["bad_labels"]:
            raise ValueError(f"{what}: labels must be in [0, {self.num_classes}), "
                             f"got values from {int(out['min_label'])} to {int(out['max_label'])}")
        if out["nonfinite"]:
            raise ValueError(f"{what}: x contains NaN or Inf")


def combine(gathered, k):
    """Rows of the replicas' float64 ``[k sums, *CHECKS]`` (``gathered``, (replicas, k + 4))
    -> the ``k`` summed columns, one by one, then the combined checks (a replica without
    samples reports +/- the largest int64 as its min/max label, which the others' beat)."""
    sums = tf.reduce_sum(gathered[:, :k], axis=0)
    checks = tf.stack([tf.reduce_sum(gathered[:, -4]), tf.reduce_sum(gathered[:, -3]),
                       tf.reduce_min(gathered[:, -2]), tf.reduce_max(gathered[:, -1])])
    return (*tf.unstack(sums, num=k), checks)
