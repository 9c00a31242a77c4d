#!/usr/bin/env python
"""Make the README's Grad-CAM montage: train a WRN-10-1 on volumes whose class is the octant a
bright blob sits in, then draw the Grad-CAM of one test volume over its depth slices.

    python examples/explain_blobs.py            # writes runs/explain_blobs/blob_cam.png
    python examples/explain_blobs.py --out docs/images/blob_cam.png   # the README's picture, replaced

The five lines after the imports are the README's.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from wrn3d_tl.commands import Parser, positive_int, quiet_tensorflow  # noqa: E402


def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "explain_blobs", "blob_cam.png"),
                   help="the PNG to write (its folder is created; --out docs/images/blob_cam.png replaces the README's)")
    p.add_argument("--steps", type=positive_int, default=100, help="training iterations")
    args = p.parse_args(argv)
    tf = quiet_tensorflow()
    from wrn3d_tl.data import synthetic_blobs
    from wrn3d_tl.explain import grad_cam, save_montage
    from wrn3d_tl.model import WRNConfig, build_wrn
    from wrn3d_tl.train import Trainer

    tf.random.set_seed(0)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    (x, y), (x_test, y_test) = synthetic_blobs(256, 64, shape=(8, 8, 8))      # class = the blob's octant
    trainer = Trainer(build_wrn(WRNConfig(depth=10, widen_factor=1, num_classes=8, input_shape=(8, 8, 8, 1))),
                      (x, y), batch_size=32, lr=0.05, schedule="cosine", total_steps=args.steps)
    trainer.fit(args.steps)
    cams = grad_cam(trainer, x_test[:1], layer="group1")                       # (1, 8, 8, 8) in [0, 1]
    save_montage(x_test[0], args.out, cam=cams[0], title=f"octant {y_test[0]}")
    print(f"test accuracy {trainer.evaluate((x_test, y_test), log=False)['accuracy']:.3f}; montage -> {args.out}")
    return args.out


if __name__ == "__main__":
    main()
