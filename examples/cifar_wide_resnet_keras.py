"""Train a 3D (or 2D) WRN-d-k on CIFAR tiled into volumes, with plain Keras 3 layers.

The Keras twin of ``examples/cifar_wide_resnet_tl.py``: the network comes from
``wrn3d_tl.keras_twin.build_keras_wrn`` (same architecture and layer names as
``build_wrn``), the data from ``wrn3d_tl.data``, and training is a custom loop with
SGD + Nesterov momentum 0.9 whose step is a ``tf.function`` (one step per call).

    python examples/cifar_wide_resnet_keras.py --iters 10            # WRN-10-2, 3D, 4x32x32
    python examples/cifar_wide_resnet_keras.py --dataset cifar100 --depth 28 --width 10 --dims 2

Batches are NDHWC (batch, depth, height, width, channels) float32 for ``--dims 3`` and
NHWC for ``--dims 2``; labels are int64. Without the real CIFAR files under
``--data-dir`` a synthetic CIFAR-shaped set is used instead, and one loud line says so.
"""

import time

import wrn3d_tl  # noqa: F401  (before TensorFlow: oneDNN on where TensorFlow leaves it off)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from wrn3d_tl import data  # noqa: E402
from wrn3d_tl.commands import Parser  # noqa: E402
from wrn3d_tl.keras_twin import build_keras_wrn, count_keras_params  # noqa: E402
from wrn3d_tl.model import WRNConfig  # noqa: E402

_SYNTHETIC_SIZES = (512, 128)  # (n_train, n_test)


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=["cifar10", "cifar100", "synthetic"], default="cifar10",
                   help="falls back to synthetic data when the real set is not found")
    p.add_argument("--data-dir", default=None, help="directory holding the CIFAR python batches")
    p.add_argument("--depth", type=int, default=10, help="WRN depth d = 6n + 4")
    p.add_argument("--width", type=int, default=2, help="widen factor k")
    p.add_argument("--dims", type=int, choices=[2, 3], default=3, help="2: NHWC images, 3: NDHWC volumes")
    p.add_argument("--volume-depth", type=int, default=4, help="D of the tiled volumes (--dims 3)")
    p.add_argument("--tile-mode", default="repeat", choices=getattr(data, "TILE_MODES", None),
                   help="how images are tiled into volumes (--dims 3)")
    p.add_argument("--batch-size", type=int, default=32, help="volumes (or images) per step")
    p.add_argument("--lr", type=float, default=0.1, help="learning rate of SGD with Nesterov momentum 0.9")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 on kernels, as in the paper")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout between a block's convolutions, in [0, 1)")
    p.add_argument("--iters", type=int, default=10, help="training iterations")
    p.add_argument("--seed", type=int, default=0, help="data order, augmentation and initial weights")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N iterations (0: only at the end)")
    return p.parse_args(argv)


def load_data(args):
    """((x_train, y_train), (x_test, y_test), num_classes): uint8 NHWC images, int64 labels."""
    num_classes = 100 if args.dataset == "cifar100" else 10
    if args.dataset != "synthetic":
        try:
            return (*data.load_cifar(args.dataset, data_dir=args.data_dir), num_classes)
        except FileNotFoundError:
            print(f"!!! {args.dataset.upper()} NOT FOUND (see --data-dir / $WRN3D_DATA_DIR): "
                  f"USING SYNTHETIC DATA INSTEAD !!!", flush=True)
    n_train, n_test = _SYNTHETIC_SIZES
    return (*data.synthetic_cifar(n_train, n_test, num_classes=num_classes, seed=args.seed), num_classes)


def evaluate(eval_step, dataset):
    """(mean loss, accuracy) over a finite dataset."""
    loss_sum = correct = count = 0.0
    for x, y in dataset:
        loss, n_correct = eval_step(x, y)
        n = int(y.shape[0])
        loss_sum, correct, count = loss_sum + float(loss) * n, correct + float(n_correct), count + n
    return loss_sum / max(count, 1), correct / max(count, 1)


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test), num_classes = load_data(args)
    volume_depth = args.volume_depth if args.dims == 3 else None
    norm = data.compute_normalization(x_train)
    common = dict(batch_size=args.batch_size, volume_depth=volume_depth, tile_mode=args.tile_mode,
                  normalization=norm, seed=args.seed)
    train_ds = data.make_dataset(x_train, y_train, training=True, drop_remainder=True, repeat=True, **common)
    test_ds = data.make_dataset(x_test, y_test, training=False, **common)

    input_shape = ((volume_depth,) if volume_depth else ()) + tuple(x_train.shape[1:])
    config = WRNConfig(args.depth, args.width, num_classes=num_classes, input_shape=input_shape,
                       dropout=args.dropout)
    model = build_keras_wrn(config)
    print(f"{config.name} {args.dims}D input {input_shape}, {count_keras_params(model):,} params, "
          f"{len(x_train)} train / {len(x_test)} test samples")

    optimizer = keras.optimizers.SGD(learning_rate=args.lr, momentum=0.9, nesterov=True)
    optimizer.build(model.trainable_variables)
    xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    kernels = [w for w in model.trainable_variables if w.path.endswith("kernel")]

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = xent(y, logits)
            total = loss + args.weight_decay * 0.5 * tf.add_n([tf.reduce_sum(tf.square(k)) for k in kernels])
        grads = tape.gradient(total, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        acc = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, -1), y), tf.float32))
        return loss, acc

    @tf.function
    def eval_step(x, y):
        logits = model(x, training=False)
        return xent(y, logits), tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), y), tf.float32))

    unit = "vol/s" if volume_depth else "img/s"
    batches = iter(train_ds)
    for it in range(1, args.iters + 1):
        x, y = next(batches)
        start = time.perf_counter()
        loss, acc = train_step(x, y)
        loss, acc = float(loss), float(acc)  # waits for the step to finish
        rate = int(x.shape[0]) / (time.perf_counter() - start)
        print(f"iter {it:>5}/{args.iters}  loss {loss:.4f}  acc {acc:.4f}  {unit} {rate:.1f}", flush=True)
        if not np.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at iteration {it}")
        if args.eval_every and it % args.eval_every == 0 and it < args.iters:
            print("eval  iter {}  loss {:.4f}  acc {:.4f}".format(it, *evaluate(eval_step, test_ds)), flush=True)
    test_loss, test_acc = evaluate(eval_step, test_ds)
    print(f"final test  loss {test_loss:.4f}  acc {test_acc:.4f}", flush=True)
    return {"test_loss": test_loss, "test_acc": test_acc}


if __name__ == "__main__":
    main()
