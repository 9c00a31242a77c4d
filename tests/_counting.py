"""An augmentation that counts the decoding work of a pipeline (shared by the split-input tests)."""

import tensorflow as tf


class Counting:
    """``augment=``: records the index of every sample the pipeline decodes (the tests put a
    sample's index in its voxel (0, 0, 0, 0)), then applies ``then(sample, seed)`` if given.
    ``seen`` is in the order the parallel map ran, not the output order."""

    def __init__(self, then=None):
        self.seen = []
        self.then = then

    def __call__(self, sample, seed):
        def record(v):
            self.seen.append(int(round(float(v[0, 0, 0, 0]))))
            return v
        sample = tf.ensure_shape(tf.numpy_function(record, [sample], sample.dtype, stateful=True), sample.shape)
        return sample if self.then is None else self.then(sample, seed)
