"""Forward cost of the networks around the SD 1.5 recipe and FID on the devices present: seconds
per call and XLA FLOPs of the SD 1.5 UNet, the SD VAE decoder and the FID InceptionV3, on random
weights.

The UNet runs on 4 x s x s latents with 77 x 768 text states, the VAE decoder decodes the same
latents (s = 64: 512 px images, s = 32: 256 px), the Inception takes 299 x 299 images (no resize).
FLOPs are XLA's count of the program lowered for the device present (``common.xla_flops``).
``--flops_only`` stops there: the
programs are lowered from shapes, so nothing is allocated, compiled or timed. Otherwise each
forward is compiled and timed (``--repeats`` calls after a warm-up); run that on an otherwise
idle machine. Weights are drawn on the host (``common.random_params``): the speed and the FLOPs
do not depend on them.

Usage: python benchmarks/forward_cost.py [--networks=unet,vae,inception] [--flops_only]
           [--sizes=64,32] [--batch=1] [--inception_batch=64] [--dtype=float32|bfloat16]
           [--repeats=3] [--tiny] [--results=PATH] [--no_record]
  --tiny: tiny stand-ins of the UNet and VAE (the Inception has no tiny form), a smoke run.
Prints one JSON line and appends it to the results file (common.py) unless --no_record.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scflow_jax import xla_cpu  # noqa: E402

xla_cpu.apply_defaults()  # the CLI's XLA:CPU settings, before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import add_output_flags, random_params, record, time_calls, xla_flops  # noqa: E402
from scflow_jax import train_state  # noqa: E402
from scflow_jax.evaluation import inception  # noqa: E402
from scflow_jax.models import unet_sd  # noqa: E402
from scflow_jax.models.vae import VAE, VAEConfig  # noqa: E402
from scflow_jax.planning.programs import TINY_UNET, TINY_VAE  # noqa: E402

NETWORKS = ("unet", "vae", "inception")
TEXT_TOKENS, TEXT_DIM = 77, 768


def shapes(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def cost(fn, param_shapes, inputs: list, args, *, per: int, make_params=None) -> dict:
    """XLA GFLOP per sample of ``fn(params, *inputs)`` (``inputs`` as NumPy arrays, their first
    dimension ``per`` samples); unless --flops_only, its compile time and seconds per call on random
    parameters of ``param_shapes`` (or ``make_params()``)."""
    jitted = jax.jit(fn)
    lowered = jitted.lower(param_shapes, *shapes(inputs))
    entry = {"gflop_per_sample": xla_flops(lowered) / per / 1e9}
    if args.flops_only:
        return entry
    start = time.perf_counter()
    compiled = lowered.compile()
    entry["compile_s"] = time.perf_counter() - start
    params = jax.device_put(make_params() if make_params else random_params(param_shapes))
    inputs = [jax.device_put(x) for x in inputs]
    entry.update(time_calls(lambda: compiled(params, *inputs), warmup=1, repeats=args.repeats))
    entry["samples_per_s"] = per / entry["median_s"]
    return entry


def unet_cost(args, unet_config) -> dict:
    param_shapes = unet_sd.unet_param_shapes(unet_config)
    forward = unet_sd.make_unet_apply(unet_config, dtype=jnp.dtype(args.dtype))
    rng = np.random.default_rng(0)
    out = {"params": train_state.count_params(param_shapes), "latents": []}
    for side in args.sizes:
        x = rng.standard_normal((args.batch, side, side, unet_config.in_channels), np.float32)
        t = np.full((args.batch,), 500.0, np.float32)
        text = rng.standard_normal(
            (args.batch, TEXT_TOKENS, unet_config.cross_attention_dim), np.float32
        )
        out["latents"].append(
            {
                "latent": [side, side],
                **cost(forward, param_shapes, [x, t, text], args, per=args.batch),
            }
        )
    return out


def vae_cost(args, vae_config) -> dict:
    vae = VAE(vae_config, dtype=jnp.dtype(args.dtype))
    param_shapes = vae.param_shapes()
    decoder = {k: param_shapes[k] for k in ("decoder", "post_quant_conv")}
    rng = np.random.default_rng(1)
    out = {"decoder_params": train_state.count_params(decoder), "latents": []}
    for side in args.sizes:
        z = rng.standard_normal((args.batch, side, side, vae_config.latent_channels), np.float32)
        out["latents"].append(
            {
                "latent": [side, side],
                "image_px": side * vae_config.downsample_factor,
                **cost(vae.decode, param_shapes, [z], args, per=args.batch),
            }
        )
    return out


def inception_cost(args) -> dict:
    model = inception.InceptionV3FID()
    param_shapes = inception.abstract_params()
    size = inception.INCEPTION_SIZE
    images = np.random.default_rng(2).random((args.inception_batch, size, size, 3), np.float32)
    # Its own random init: frozen batch norms need positive variances.
    entry = cost(
        lambda p, x: model.apply({"params": p}, x),
        param_shapes,
        [images],
        args,
        per=args.inception_batch,
        make_params=inception.init_random_params,
    )
    return {
        "params": train_state.count_params(param_shapes),
        "batch": args.inception_batch,
        "input": [size, size],
        **entry,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--networks", default=",".join(NETWORKS), help=f"comma-separated, of {', '.join(NETWORKS)}"
    )
    parser.add_argument(
        "--flops_only",
        "--flops-only",
        dest="flops_only",
        action="store_true",
        help="lower and count FLOPs only: nothing allocated, compiled or timed",
    )
    parser.add_argument(
        "--sizes",
        default="64,32",
        help="latent sides for the UNet and the VAE decoder (comma-separated)",
    )
    parser.add_argument("--batch", type=int, default=1, help="UNet and VAE batch")
    parser.add_argument("--inception_batch", type=int, default=64)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="UNet and VAE compute dtype (the Inception computes in float32)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per program")
    parser.add_argument("--tiny", action="store_true", help="tiny UNet and VAE (a smoke run)")
    add_output_flags(parser)
    args = parser.parse_args(argv)
    args.networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    unknown = sorted(set(args.networks) - set(NETWORKS))
    if unknown or not args.networks:
        parser.error(f"--networks: {unknown or 'none given'}; choose from {', '.join(NETWORKS)}")
    try:
        args.sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes={args.sizes!r} must be comma-separated integers")
    for name in ("batch", "inception_batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be >= 1")
    if any(s < 1 for s in args.sizes):
        parser.error(f"--sizes={args.sizes} must all be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    unet_config, vae_config = (
        (TINY_UNET, TINY_VAE) if args.tiny else (unet_sd.UNetSDConfig(), VAEConfig())
    )
    out = {
        "tiny": args.tiny,
        "dtype": args.dtype,
        "batch": args.batch,
        "flops_only": args.flops_only,
        "device_kind": jax.devices()[0].device_kind,
    }
    measure = {
        "unet_sd": lambda: unet_cost(args, unet_config),
        "vae_decoder": lambda: vae_cost(args, vae_config),
        "inception": lambda: inception_cost(args),
    }
    for name in args.networks:
        key = {"unet": "unet_sd", "vae": "vae_decoder", "inception": "inception"}[name]
        out[key] = measure[key]()
    return record("forward_cost", out, print_only=args.no_record, path=args.results)


if __name__ == "__main__":
    main()
