"""Speed of the ADM UNet's stride-1 3x3 convolutions in different forms on the current backend.

Issue 8's profile of ``distill_step.py`` on the 2-core CPU showed the 3x3 convs dominating. This
script times, per real conv shape of ``ADMConfig.speed_benchmark()`` (batch 32 and 64), the forward
and the forward+backward (gradients wrt input and kernel) of:

* ``native``:  ``lax.conv_general_dilated`` (what ``nn.Conv`` runs);
* ``slices``:  pad, 9 shifted slices concatenated on the channel axis, one [9*Cin, Cout] matmul;
* ``taps``:    pad, 9 shifted slices each multiplied by its [Cin, Cout] tap and summed (no concat);
* ``patches``: ``lax.conv_general_dilated_patches`` + matmul;
* ``winograd``: Winograd F(2x2, 3x3): 2.25x fewer multiplies, plus input/output tile transforms.

Variants run interleaved (round-robin, several rounds) in one process so that load from other
processes hits them alike; medians are reported, in ms and GFLOP/s.

Usage: python benchmarks/conv_forms.py [--rounds 7] [--calls 5] [--batches 32 64] [--forms ...]
                                      [--shapes 16x64x64 ...]
Prints one JSON line per shape and pass; records nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from scflow_jax import xla_cpu  # noqa: E402

xla_cpu.apply_defaults()  # the CLI's XLA:CPU settings, before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

_DN = ("NHWC", "HWIO", "NHWC")

# (H = W, Cin, Cout) of the 3x3 stride-1 convs in ADMConfig.speed_benchmark() on 16x16 latents.
SHAPES = [(16, 4, 64),     # input_blocks_0_0
          (16, 64, 64),    # input_blocks_1_0 in/out, output_blocks_0..2 out_layers_3
          (16, 128, 128),  # output_blocks_5_2 (Upsample conv to 16x16)
          (16, 192, 64),   # output_blocks_6_0 in_layers_2 (concat 128 + 64)
          (16, 128, 64),   # output_blocks_7_0 / 8_0 in_layers_2
          (16, 64, 4),     # out_2
          (8, 128, 128),   # 8x8 level res blocks, Upsample conv to 8x8
          (8, 256, 128),   # output_blocks at 8x8 (concat)
          (4, 128, 128)]   # 4x4 level and middle block


def native(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN)


def _shifted(x):
    h, w = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)]


def slices(x, w):
    cols = jnp.concatenate(_shifted(x), axis=-1)
    return jnp.einsum("bhwk,ko->bhwo", cols, w.reshape(-1, w.shape[-1]))


def taps(x, w):
    out = 0.0
    for k, s in enumerate(_shifted(x)):
        out = out + jnp.einsum("bhwc,co->bhwo", s, w[k // 3, k % 3])
    return out


def patches(x, w):
    # Patch features come channel-major: index c * 9 + (i * 3 + j).
    p = jax.lax.conv_general_dilated_patches(x, (3, 3), (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN)
    return jnp.einsum("bhwk,ko->bhwo", p, jnp.transpose(w, (2, 0, 1, 3)).reshape(-1, w.shape[-1]))


# Winograd F(2x2, 3x3) (Lavin & Gray 2015): each 2x2 output tile from a 4x4 input tile with 16 products
# per channel pair instead of 36, i.e. the matmul work of 16 [tiles, Cin] x [Cin, Cout] products.
_WINO_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_WINO_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)
_WINO_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)


def _combine(coefficients, items):
    """sum_i c_i * items[i], skipping zeros and writing +-1 as adds (the transforms are sparse)."""
    out = None
    for c, item in zip(coefficients, items):
        if c != 0:
            term = item if c == 1 else -item if c == -1 else float(c) * item
            out = term if out is None else out + term
    return out


def winograd(x, w):
    b, h, wd, cin = x.shape
    cout = w.shape[-1]
    th, tw = h // 2, wd // 2
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    d = [[xp[:, i:i + h:2, j:j + wd:2, :] for j in range(4)] for i in range(4)]  # 4x4 of [b, th, tw, cin]
    rows = [[_combine(_WINO_BT[a], [d[i][j] for i in range(4)]) for j in range(4)] for a in range(4)]
    v = jnp.stack([_combine(_WINO_BT[c], rows[a]) for a in range(4) for c in range(4)])
    u = jnp.einsum("ai,ijco,bj->abco", _WINO_G, w, _WINO_G).reshape(16, cin, cout)
    m = jnp.einsum("pnc,pco->pno", v.reshape(16, b * th * tw, cin), u).reshape(4, 4, b, th, tw, cout)
    out_rows = [[_combine(_WINO_AT[r], [m[a, c] for a in range(4)]) for c in range(4)] for r in range(2)]
    y = jnp.stack([jnp.stack([_combine(_WINO_AT[s], out_rows[r]) for s in range(2)]) for r in range(2)])
    return y.transpose(2, 3, 0, 4, 1, 5).reshape(b, h, wd, cout)  # [2, 2, b, th, tw, o] -> tiles in place


FORMS = {"native": native, "slices": slices, "taps": taps, "patches": patches, "winograd": winograd}


def _fwd_bwd(form):
    def f(x, w, ct):
        y, pull = jax.vjp(form, x, w)
        return pull(ct)
    return f


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5, help="calls per timed sample")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    parser.add_argument("--shapes", nargs="+", default=[f"{h}x{i}x{o}" for h, i, o in SHAPES],
                        help="HxCINxCOUT, e.g. 16x64x64")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    for batch in args.batches:
        for hw, cin, cout in (tuple(int(v) for v in shape.split("x")) for shape in args.shapes):
            x = jnp.asarray(rng.standard_normal((batch, hw, hw, cin), np.float32))
            w = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32) / np.sqrt(9 * cin))
            ct = jnp.asarray(rng.standard_normal((batch, hw, hw, cout), np.float32))
            gflop = 2 * batch * hw * hw * 9 * cin * cout / 1e9
            ref_y, ref_g = jax.jit(native)(x, w), jax.jit(_fwd_bwd(native))(x, w, ct)
            for pass_name, make, args_, flop in (("fwd", lambda f: f, (x, w), gflop),
                                                 ("fwd+bwd", _fwd_bwd, (x, w, ct), 3 * gflop)):
                fns = {name: jax.jit(make(FORMS[name])) for name in args.forms}
                err = {}
                for name, fn in fns.items():  # compile, warm up, check agreement with native
                    out = jax.block_until_ready(fn(*args_))
                    ref = ref_y if pass_name == "fwd" else ref_g
                    err[name] = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                                    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
                times = {name: [] for name in fns}
                for _ in range(args.rounds):
                    for name, fn in fns.items():
                        start = time.perf_counter()
                        for _ in range(args.calls):
                            jax.block_until_ready(fn(*args_))
                        times[name].append((time.perf_counter() - start) / args.calls)
                med = {name: statistics.median(t) for name, t in times.items()}
                print(json.dumps({
                    "batch": batch, "hw": hw, "cin": cin, "cout": cout, "pass": pass_name,
                    "ms": {n: round(1e3 * m, 3) for n, m in med.items()},
                    "gflop_s": {n: round(flop / m, 1) for n, m in med.items()},
                    "max_rel_err_vs_native": {n: float(f"{e:.1e}") for n, e in err.items()}}), flush=True)


if __name__ == "__main__":
    main()
