"""Does the compiler keep remat's savings? Temporary memory of gradients compiled with and without remat.

Why: the SD 1.5 recipe fits its 20 samples per GPU only through remat (``config.model.remat``), and
a compiler can undo it. jaxlib 0.10.2's XLA:CPU (what pip gives on Python 3.11) does: its buffer
assignment gives the same temporaries with and without. jaxlib 0.11.2's and 0.12's keep the
savings (see the README's "Scaling out"). This probe asks the same of whatever backend and version
runs it, from compiled programs only (nothing is allocated, seconds on a GPU):

* ``chain``: 16 blocks of 4 matmuls + tanh on a [4096, 512] activation, each block under
  ``jax.checkpoint`` or not;
* ``sd_unet``: the SD UNet's parameter gradient (the tiny test UNet at 32x32 latents, batch 8; with
  --sd15 the SD 1.5 UNet at 64x64 latents, batch 1), ``remat=False`` against ``remat=True`` (every
  resnet and transformer block rematerialised, as the recipe does).

For each it reports XLA's temporary bytes (``compiled.memory_analysis()``) and the dots and
convolutions of the compiled program: a remat program that the compiler keeps recomputes, so it
has more of them, and needs fewer temporaries.

Usage: python benchmarks/remat_probe.py [--sd15] [--no_record]
Prints one JSON line and appends it to benchmarks/results.json unless --no_record.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scflow_jax import xla_cpu  # noqa: E402

xla_cpu.apply_defaults()  # the CLI's XLA:CPU settings, before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import t2i_speed  # noqa: E402
from common import compiled_memory_gib, record  # noqa: E402
from scflow_jax.models import unet_sd  # noqa: E402


def compiled_figures(fn, *abstract_args) -> dict:
    compiled = jax.jit(fn).lower(*abstract_args).compile()
    text = compiled.as_text()
    return {"temp_mib": compiled_memory_gib(compiled)["temporaries"] * 1024,
            "dots": text.count(" dot("), "convolutions": text.count(" convolution(")}


def chain_case(remat: bool) -> dict:
    def block(w, x):
        for _ in range(4):
            x = jnp.tanh(x @ w)
        return x

    def loss(ws, x):
        step = jax.checkpoint(block) if remat else block
        for w in ws:
            x = step(w, x)
        return jnp.sum(x * x)

    weights = [jax.ShapeDtypeStruct((512, 512), jnp.float32)] * 16
    return compiled_figures(jax.grad(loss), weights, jax.ShapeDtypeStruct((4096, 512), jnp.float32))


def unet_case(config: unet_sd.UNetSDConfig, side: int, batch: int, remat: bool) -> dict:
    model = unet_sd.UNet2DConditionModel(config, remat=remat)

    def loss(params, x, t, text):
        return jnp.mean(jnp.square(model.apply({"params": params}, x, t, text)))

    return compiled_figures(jax.grad(loss), unet_sd.unet_param_shapes(config),
                            jax.ShapeDtypeStruct((batch, side, side, config.in_channels), jnp.float32),
                            jax.ShapeDtypeStruct((batch,), jnp.float32),
                            jax.ShapeDtypeStruct((batch, t2i_speed.TEXT_TOKENS, t2i_speed.TEXT_DIM), jnp.float32))


def probe(sd15: bool) -> dict:
    if sd15:
        config, side, batch = unet_sd.UNetSDConfig(), 64, 1
    else:
        config, side, batch = t2i_speed.TINY_UNET, 32, 8
    out = {"sd15": sd15, "unet_latents": [batch, side, side, config.in_channels]}
    for name, case in (("chain", chain_case), ("sd_unet", lambda r: unet_case(config, side, batch, r))):
        plain, remat = case(False), case(True)
        out[name] = {"without_remat": plain, "with_remat": remat,
                     "temp_ratio_with_over_without": remat["temp_mib"] / plain["temp_mib"]}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd15", action="store_true", help="the SD 1.5 UNet at 64x64 latents (else the tiny one)")
    parser.add_argument("--no_record", action="store_true", help="print only")
    args = parser.parse_args(argv)
    return record("remat_probe", probe(args.sd15), print_only=args.no_record)


if __name__ == "__main__":
    main()
