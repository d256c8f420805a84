"""The two forms of nearest 2x upsampling + 3x3 conv (models/upsample_conv.py) on this device, at the
layers of the SD 1.5 UNet and VAE decoder at 512 px: which is faster, for generation (forward) and for
training (forward + backward)?

CPU programs compute the VAE decoder's (and the ADM's) by output phases (four 2x2 convs of the input:
2.25x fewer FLOPs, no upsampled map), measured faster there; the SD UNet's stay as written on the CPU
(this script found the phase form slower at its small, wide maps), and GPU and TPU programs keep all
as written (the upsampled map convolved) until a device has measured both. The VAE decoder's three
upsampling convs are 696 of its 2505 GFLOP per 512 px image, so on a GPU this decides whether 1-step
generation can count 2.91 TFLOP per image instead of 3.30 (README, Performance). Both forms are called
directly here, whatever the device.

Usage: python benchmarks/upsample_forms.py [--batch=8] [--dtype=bfloat16] [--tiny] [--no_record]
  --tiny: small layers, for a CPU smoke run.
Prints one JSON line and appends it to benchmarks/results.json unless --no_record: per layer, the median
milliseconds of each form forward and forward + backward, the ratios plain / phases (above 1: the phase
form is faster), and the largest difference of the output and of the three gradients between the forms
(computed in float32), relative to the plain form's largest magnitude. Exits non-zero when a difference
exceeds --tolerance.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common import exit_past_tolerance, forward_and_backward, record, relative_difference, time_calls  # noqa: E402
from scflow_jax.models import upsample_conv  # noqa: E402

# (network, input side, channels) of each upsampling layer at 512 px (64x64 latents).
SD15_LAYERS = (("unet", 8, 1280), ("unet", 16, 1280), ("unet", 32, 640),
               ("vae_decoder", 64, 512), ("vae_decoder", 128, 512), ("vae_decoder", 256, 256))
TINY_LAYERS = (("tiny", 4, 8), ("tiny", 8, 16))
FORMS = {"plain": upsample_conv.plain_form, "phases": upsample_conv.phase_form}


def time_layer(network: str, side: int, channels: int, batch: int, dtype) -> dict:
    rngs = jax.random.split(jax.random.PRNGKey(side * channels), 4)
    x = jax.random.normal(rngs[0], (batch, side, side, channels), dtype)
    kernel = (jax.random.normal(rngs[1], (3, 3, channels, channels), jnp.float32) / (3 * channels ** 0.5)).astype(dtype)
    bias = jax.random.normal(rngs[2], (channels,), dtype)
    cotangent = jax.random.normal(rngs[3], (batch, 2 * side, 2 * side, channels), dtype)
    layer = {"network": network, "input_side": side, "channels": channels, "batch": batch,
             "plain_gflop": 2 * 9 * (2 * side) ** 2 * channels ** 2 * batch / 1e9}
    results = {}
    for name, form in FORMS.items():
        forward, both = jax.jit(form), forward_and_backward(form)
        # Compared in float32, where only the order of additions differs between the forms (in bf16 the
        # bias gradient's sums alone differ by a few percent).
        results[name] = both(*(a.astype(jnp.float32) for a in (x, kernel, bias, cotangent)))
        layer[f"{name}_fwd_ms"] = 1e3 * time_calls(lambda: forward(x, kernel, bias), warmup=2, repeats=10)["median_s"]
        layer[f"{name}_fwd_bwd_ms"] = 1e3 * time_calls(lambda: both(x, kernel, bias, cotangent),
                                                       warmup=2, repeats=10)["median_s"]
    layer["plain_over_phases_fwd"] = layer["plain_fwd_ms"] / layer["phases_fwd_ms"]
    layer["plain_over_phases_fwd_bwd"] = layer["plain_fwd_bwd_ms"] / layer["phases_fwd_bwd_ms"]
    names = ("output", "grad_x", "grad_kernel", "grad_bias")
    layer["relative_difference"] = {n: relative_difference(got, want)
                                    for n, got, want in zip(names, results["phases"], results["plain"])}
    return layer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="images per call")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest relative difference allowed between the forms, computed in float32")
    parser.add_argument("--tiny", action="store_true", help="small layers (CPU smoke run)")
    parser.add_argument("--no_record", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    layers = [time_layer(*layer, args.batch, jnp.dtype(args.dtype))
              for layer in (TINY_LAYERS if args.tiny else SD15_LAYERS)]
    out = record("upsample_forms", {"tiny": args.tiny, "device_kind": jax.devices()[0].device_kind,
                                    "dtype": args.dtype, "layers": layers}, print_only=args.no_record)
    exit_past_tolerance("upsample_forms", layers, args.tolerance, "the two forms do not compute the same layer")
    return out


if __name__ == "__main__":
    main()
