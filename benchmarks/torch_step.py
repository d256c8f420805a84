"""The issue-8 work in PyTorch: the same iteration and samplers as ``distill_step.py``, on this machine, now.

Why: the authors' PyTorch figures quoted in issue 8 were measured once, at an unknown hour, and this
machine's speed drifts by tens of percent from hour to hour. A PyTorch program doing the same work
can be timed beside ours (``benchmarks/versus_torch.py`` alternates the two), which turns the
comparison into a ratio measured under the same conditions.

It is not the authors' code (their code is GPL and is not used here). It is written from the same
description, with the networks of ``tests/torch_restatements.py``: guided-diffusion's UNetModel
(parity with our ADM UNet is tested) and the StyleGAN2 discriminator (parity of logits and of R1's
input gradient is tested), at the sizes ``distill_step.benchmark_setup`` fixes. One iteration is
what ``distill.make_train_step`` does once: teacher forward, both target forwards as one call of
the doubled batch, the one-step sample with gradient; the D step (R1 with gamma 1 by double
backward, real and fake, AdamW 1e-4); the G step (consistency, inverse, self-corrected reflow and
GAN terms, one backward, AdamW 2e-5); target EMA 0.9 and eval EMA 0.9999. Written the way PyTorch
code is usually written: eager, float32, torch's default optimizers and thread count.

Usage: python benchmarks/torch_step.py [--tiny] [--no-record] [--repeats 20] [--warmup 3]
Needs torch (the test extras: ``make install-test``). CPU only. Prints one JSON line with the
figures ``distill_step.py`` prints (``iteration``, ``sample_1step_64``, ``sample_4step_64``,
``matmul_f32``) and appends it to benchmarks/results.json (unless --no-record).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # the PyTorch re-statements are test code

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import distill_step  # noqa: E402  (the fixed configuration, defined once)
from common import record  # noqa: E402
from torch_restatements import TorchADM, TorchStyleGANDiscriminator  # noqa: E402

def time_calls(fn, *, warmup: int, repeats: int) -> dict:
    """Seconds per call of ``fn()`` (CPU torch runs eagerly: a call's return means its work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "mean_s": statistics.fmean(times)}


class _NoModuleTracking:
    """Stands in for FlopCounterMode's module tracker, whose backward hooks break ``autograd.grad`` with
    ``create_graph=True`` (R1): every count goes to the global total, the only figure used here."""
    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def count_flops(fn) -> float:
    """FLOPs of one call of ``fn()`` as torch counts them (convolutions, matmuls, attention; forward and backward)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracking()
    with counter:
        fn()
    return float(counter.get_total_flops())


def pseudo_huber(x, y, c):
    return (torch.sqrt(torch.square(x - y) + c * c) - c).mean()


def per_example(t):
    return t[:, None, None, None]


def discriminator_objective(disc, real, fake, r1_gamma: float):
    """``(L_D + R1, R1)``: softplus losses on real and fake logits, R1 on the real inputs by double backward
    (``losses/adversarial.py``'s objective); D's parameters get gradients, the inputs do not."""
    disc.requires_grad_(True)
    real = real.detach().requires_grad_(True)
    real_logits = disc(real)
    (grad_real,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    r1 = 0.5 * r1_gamma * grad_real.square().flatten(1).sum(1).mean()
    return F.softplus(-real_logits).mean() + F.softplus(disc(fake.detach())).mean() + r1, r1


class TorchSCFlow:
    """Student, target, eval EMA and teacher (all guided-diffusion UNets, NCHW), discriminator, optimizers."""

    def __init__(self, setup, seed: int = 0):
        unet_config, disc, latent_shape, batch_size, cfg = setup
        torch.manual_seed(seed)
        self.cfg, self.batch_size = cfg, batch_size
        h, w, c = latent_shape
        self.latent_shape = (c, h, w)
        self.teacher = TorchADM(unet_config).requires_grad_(False)
        self.student = TorchADM(unet_config)
        self.student.load_state_dict(self.teacher.state_dict())  # student, target and EMA start as the teacher
        self.target = TorchADM(unet_config).requires_grad_(False)
        self.target.load_state_dict(self.teacher.state_dict())
        self.ema = TorchADM(unet_config).requires_grad_(False)
        self.ema.load_state_dict(self.teacher.state_dict())
        self.disc = TorchStyleGANDiscriminator(disc.resolution, disc.in_channels, disc.channel_base,
                                               disc.channel_max, disc.mbstd_group_size)
        adamw = lambda params, lr: torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)  # noqa: E731
        self.g_opt = adamw(self.student.parameters(), distill_step.G_LEARNING_RATE)
        self.d_opt = adamw(self.disc.parameters(), distill_step.D_LEARNING_RATE)
        self.z0 = torch.randn((batch_size,) + self.latent_shape)

    def iteration(self) -> dict:
        cfg, z0, b = self.cfg, self.z0, self.batch_size
        t = torch.rand(b)
        z1 = torch.randn_like(z0)
        x_t = per_example(t) * z1 + per_example(1 - t) * z0
        u = torch.rand(2, b)
        t_minus = t - u[0] * torch.clamp(t, max=cfg.init_threshold)
        t_plus = t + u[1] * torch.clamp(1 - t, max=cfg.init_threshold)
        with torch.no_grad():  # teacher Euler steps down and up, both target predictions in one call
            v_teacher = self.teacher(t, x_t)
            times = torch.cat([t_minus, t_plus])
            xs = torch.cat([x_t + per_example(t_minus - t) * v_teacher, x_t + per_example(t_plus - t) * v_teacher])
            predictions = xs - per_example(times) * self.target(times, xs)
            target_minus = torch.where(per_example(t_minus < cfg.trunc_threshold), z0, predictions[:b])
            target_plus = predictions[b:]
        z0_hat = z1 - self.student(torch.ones(b), z1)  # the one-step sample, with gradient

        # D step: R1 (double backward) on the real latents, the fake ones detached.
        loss_d, r1 = discriminator_objective(self.disc, z0, z0_hat, cfg.r1_gamma)
        self.d_opt.zero_grad(set_to_none=True)
        loss_d.backward()
        self.d_opt.step()

        # G step: the student at (t, x_t) and (t, x~_t) in one call, the GAN term through the updated, frozen D.
        self.disc.requires_grad_(False)
        x_tilde = per_example(t) * z1 + per_example(1 - t) * z0_hat.detach()
        times, xs = torch.cat([t, t]), torch.cat([x_t, x_tilde])
        predictions = xs - per_example(times) * self.student(times, xs)
        current = predictions[:b]
        terms = {"loss_con": pseudo_huber(current, target_minus, cfg.huber_c),
                 "loss_inv": pseudo_huber(current, target_plus, cfg.huber_c),
                 "loss_rf": (predictions[b:] - z0_hat.detach()).square().mean(),
                 "loss_gan": F.softplus(-self.disc(z0_hat)).mean()}
        loss = (cfg.lambda_con * terms["loss_con"] + cfg.lambda_inv * terms["loss_inv"]
                + cfg.lambda_rf * terms["loss_rf"] + cfg.lambda_gan * terms["loss_gan"])
        self.g_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.g_opt.step()

        with torch.no_grad():
            student = list(self.student.parameters())
            torch._foreach_lerp_(list(self.target.parameters()), student, 1.0 - cfg.target_ema)
            torch._foreach_lerp_(list(self.ema.parameters()), student, 1.0 - cfg.eval_ema)
        values = {"loss": loss, "loss_disc": loss_d, "r1": r1, **terms}
        return {k: float(v.detach()) for k, v in values.items()}

    @torch.no_grad()
    def sample(self, z1, steps: int):
        """Euler from t = 1 to t = 0 with the eval-EMA student."""
        x, grid = z1, torch.linspace(1.0, 0.0, steps + 1)
        for t, t_next in zip(grid[:-1], grid[1:]):
            x = x + (t_next - t) * self.ema(t.expand(x.shape[0]), x)
        return x


def matmul_rate(n: int = 2048, repeats: int = 20) -> dict:
    """The float32 n^3 matmul yardstick of ``common.matmul_rate``, through torch."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = time_calls(lambda: a @ b, warmup=3, repeats=repeats)
    return {"matmul_n": n, **t, "gflop_s": 2 * n ** 3 / t["median_s"] / 1e9}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny networks (checks the script, measures nothing)")
    parser.add_argument("--no-record", action="store_true", help="print only")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")

    setup = distill_step.tiny_setup() if args.tiny else distill_step.benchmark_setup(full=False)
    work = TorchSCFlow(setup)
    out = {"config": "tiny" if args.tiny else "issue8_small", "framework": "torch", "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "latent_shape": list(setup[2]), "batch_size": work.batch_size,
           "unet_params": sum(p.numel() for p in work.student.parameters()),
           "disc_params": sum(p.numel() for p in work.disc.parameters())}

    out["step_gflop"] = count_flops(work.iteration) / 1e9
    t = time_calls(work.iteration, warmup=args.warmup, repeats=args.repeats)
    out["iteration"] = {**t, "examples_per_s": work.batch_size / t["median_s"],
                        "gflop_s": out["step_gflop"] / t["median_s"]}
    out["last_losses"] = work.iteration()

    z1 = torch.randn((64,) + work.latent_shape)
    out["network_eval_64_gflop"] = count_flops(lambda: work.sample(z1, 1)) / 1e9
    for steps in (1, 4):
        t = time_calls(lambda: work.sample(z1, steps), warmup=2, repeats=10)
        out[f"sample_{steps}step_64"] = {**t, "gflop_s": steps * out["network_eval_64_gflop"] / t["median_s"]}
    out["matmul_f32"] = matmul_rate()
    return record("torch_step", out, print_only=args.no_record)


if __name__ == "__main__":
    main()
