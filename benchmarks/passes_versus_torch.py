"""Which passes of the issue-8 networks are slower than PyTorch's: forward, gradient, R1, each timed in both.

``versus_torch.py`` compares whole iterations; this script splits them into the network passes an
iteration is made of and times each in scflow_jax (jitted) and in PyTorch (eager, the re-statements
of ``tests/torch_restatements.py``), in one process, the two frameworks in turn within every part
and the order swapped from part to part:

* ``unet_forward``: the ADM UNet's forward of twice the batch (64 latents) without gradient (what
  sampling does);
* ``unet_gradient``: forward and backward to the parameters at twice the batch (the student's call
  on the doubled batch in the G step);
* ``disc_r1_step``: the discriminator update's gradient: real logits with R1 (double backward),
  fake logits, softplus losses, gradient to D's parameters, at the batch (32 latents);
* ``disc_input_gradient``: the GAN term's gradient to D's input (the generator's side).

Usage: python benchmarks/passes_versus_torch.py [--repeats 10] [--tiny] [--no-record]
Needs torch (``make install-test``). CPU only. Prints one JSON line and appends it to
benchmarks/results.json (unless --no-record).
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # the PyTorch re-statements are test code

import distill_step  # noqa: E402  (applies the CLI's XLA:CPU settings; the fixed configuration)
import torch_step  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from common import random_params, record  # noqa: E402
from scflow_jax.losses import adversarial  # noqa: E402
from scflow_jax.models.unet_adm import ADMUNet  # noqa: E402
from torch_restatements import TorchADM, TorchStyleGANDiscriminator  # noqa: E402


def jax_parts(setup) -> dict:
    unet_config, disc, latent_shape, batch_size, _ = setup
    unet = ADMUNet(unet_config)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2 * batch_size,) + latent_shape, np.float32))
    t = jnp.linspace(0.0, 1.0, 2 * batch_size)
    params = random_params(jax.eval_shape(lambda: unet.init(jax.random.key(0), x[:2], t[:2]))["params"])
    disc_params = random_params(jax.eval_shape(lambda: disc.init(jax.random.key(0), x[:2]))["params"])
    real, fake = x[:batch_size], x[batch_size:]

    forward = jax.jit(lambda p, x, t: unet.apply({"params": p}, x, t))
    gradient = jax.jit(jax.grad(lambda p, x, t: jnp.mean(jnp.square(unet.apply({"params": p}, x, t)))))
    disc_fn = lambda p, x, c: disc.apply({"params": p}, x)  # noqa: E731

    def disc_objective(p, real, fake):
        r1, real_logits = adversarial.r1_penalty(disc_fn, p, real, None, 1.0)
        return adversarial.discriminator_loss(real_logits, disc_fn(p, fake, None)) + r1

    r1_step = jax.jit(jax.grad(disc_objective))
    input_gradient = jax.jit(jax.grad(lambda x, p: adversarial.generator_loss(disc_fn(p, x, None))))
    ready = jax.block_until_ready
    return {"unet_forward": lambda: ready(forward(params, x, t)),
            "unet_gradient": lambda: ready(gradient(params, x, t)),
            "disc_r1_step": lambda: ready(r1_step(disc_params, real, fake)),
            "disc_input_gradient": lambda: ready(input_gradient(real, disc_params))}


def torch_parts(setup) -> dict:
    unet_config, disc, latent_shape, batch_size, _ = setup
    torch.manual_seed(0)
    unet = TorchADM(unet_config)
    d = TorchStyleGANDiscriminator(disc.resolution, disc.in_channels, disc.channel_base, disc.channel_max,
                                   disc.mbstd_group_size)
    h, w, c = latent_shape
    x = torch.randn(2 * batch_size, c, h, w)
    t = torch.linspace(0.0, 1.0, 2 * batch_size)
    real, fake = x[:batch_size], x[batch_size:]

    def forward():
        with torch.no_grad():
            unet(t, x)

    def gradient():
        unet.zero_grad(set_to_none=True)
        unet(t, x).square().mean().backward()

    def r1_step():
        d.zero_grad(set_to_none=True)
        torch_step.discriminator_objective(d, real, fake, 1.0)[0].backward()

    def input_gradient():
        d.requires_grad_(False)
        r = real.clone().requires_grad_(True)
        torch.autograd.grad(F.softplus(-d(r)).mean(), r)

    return {"unet_forward": forward, "unet_gradient": gradient, "disc_r1_step": r1_step,
            "disc_input_gradient": input_gradient}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="tiny networks (checks the script, measures nothing)")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    if jax.default_backend() != "cpu":
        raise SystemExit(f"passes_versus_torch.py compares CPU programs; the default backend is "
                         f"{jax.default_backend()} (run with JAX_PLATFORMS=cpu)")

    setup = distill_step.tiny_setup() if args.tiny else distill_step.benchmark_setup(full=False)
    frameworks = {"scflow_jax": jax_parts(setup), "torch": torch_parts(setup)}
    out = {"config": "tiny" if args.tiny else "issue8_small", "repeats": args.repeats, "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "unet_batch": 2 * setup[3], "disc_batch": setup[3], "parts": {}}
    for i, part in enumerate(frameworks["torch"]):
        order = list(frameworks) if i % 2 == 0 else list(frameworks)[::-1]
        # Every part's callable finishes its work before returning (jax: block_until_ready; CPU torch: eager).
        timings = {name: torch_step.time_calls(frameworks[name][part], warmup=2, repeats=args.repeats)
                   for name in order}
        timings["speedup_of_scflow_jax"] = timings["torch"]["median_s"] / timings["scflow_jax"]["median_s"]
        out["parts"][part] = timings
    return record("passes_versus_torch", out, print_only=args.no_record)


if __name__ == "__main__":
    main()
