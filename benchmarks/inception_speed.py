"""FID Inception feature extraction: images/s and XLA FLOPs per image.

Usage: python benchmarks/inception_speed.py [--batch 64] [--flops-only]
Random parameters (the speed and FLOPs do not depend on the weights); 299x299 inputs, so no resize.
Writes one entry to benchmarks/results.json.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import record, time_calls, xla_flops  # noqa: E402
from scflow_jax.evaluation import inception  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--flops-only", action="store_true", help="compile and count FLOPs; do not time")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    model = inception.InceptionV3FID()
    params = jax.tree.map(jnp.asarray, inception.init_random_params())
    images = jnp.asarray(np.random.default_rng(0).random(
        (args.batch, inception.INCEPTION_SIZE, inception.INCEPTION_SIZE, 3), dtype=np.float32))
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
    lowered = fn.lower(params, images)
    compiled = lowered.compile()
    flops = xla_flops(lowered)
    out = {"batch": args.batch, "input": [inception.INCEPTION_SIZE] * 2, "dtype": "float32",
           "xla_flops_per_image": flops / args.batch}
    if not args.flops_only:
        t = time_calls(lambda: compiled(params, images), warmup=1, repeats=args.repeats)
        out.update(t, images_per_s=args.batch / t["median_s"])
    record("inception_speed", out)


if __name__ == "__main__":
    main()
