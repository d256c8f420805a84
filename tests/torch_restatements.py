"""Independent PyTorch re-statements (NCHW) of this project's networks, written from the
architecture descriptions.

Test code: numerical references for the parity tests and key/shape generators for the converter
tests. Independent of the Flax code.

* ``TorchADM``: guided-diffusion's UNetModel forward with its attribute names, so ``state_dict()``
  is the key layout an LFM checkpoint has.
* ``TorchStyleGANDiscriminator``: the StyleGAN2-ADA "resnet" discriminator as
  ``models/discriminators.py`` builds it (equalized learning rate, [1, 3, 3, 1] low-pass before
  every 2x downsampling, minibatch-stddev epilogue, unconditional), with its blur written the way
  PyTorch code writes it: a depthwise convolution.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn as tnn
from torch.nn import functional as F

if TYPE_CHECKING:  # the ADM modules read an ADMConfig's fields; nothing else of scflow_jax is used
    from scflow_jax.models.unet_adm import ADMConfig


def _t_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TResBlock(tnn.Module):
    def __init__(self, ch, emb_ch, out_ch, cfg, up=False, down=False):
        super().__init__()
        self.scale_shift, self.up, self.down = cfg.use_scale_shift_norm, up, down
        self.in_layers = tnn.Sequential(
            tnn.GroupNorm(cfg.num_groups, ch), tnn.SiLU(), tnn.Conv2d(ch, out_ch, 3, padding=1)
        )
        self.emb_layers = tnn.Sequential(
            tnn.SiLU(), tnn.Linear(emb_ch, out_ch * (2 if self.scale_shift else 1))
        )
        self.out_layers = tnn.Sequential(
            tnn.GroupNorm(cfg.num_groups, out_ch),
            tnn.SiLU(),
            tnn.Dropout(0.0),
            tnn.Conv2d(out_ch, out_ch, 3, padding=1),
        )
        self.skip_connection = tnn.Identity() if ch == out_ch else tnn.Conv2d(ch, out_ch, 1)

    def _resample(self, x):
        if self.up:
            return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        return torch.nn.functional.avg_pool2d(x, 2) if self.down else x

    def forward(self, x, emb):
        h = self.in_layers[1](self.in_layers[0](x))
        h, x = self._resample(h), self._resample(x)
        h = self.in_layers[2](h)
        e = self.emb_layers(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[1](h))
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class TAttention(tnn.Module):
    def __init__(self, ch, heads, cfg):
        super().__init__()
        self.heads, self.new_order = heads, cfg.use_new_attention_order
        self.norm = tnn.GroupNorm(cfg.num_groups, ch)
        self.qkv = tnn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = tnn.Conv1d(ch, ch, 1)

    def forward(self, x):
        b, c, hh, ww = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        n, ch, length = self.heads, c // self.heads, x.shape[-1]
        if self.new_order:  # q, k, v blocks, each split into heads
            q, k, v = (z.reshape(b * n, ch, length) for z in qkv.chunk(3, dim=1))
        else:  # heads, each holding its q, k, v
            q, k, v = qkv.reshape(b * n, 3 * ch, length).split(ch, dim=1)
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, length)
        return (x + self.proj_out(a)).reshape(b, c, hh, ww)


class TDown(tnn.Module):
    def __init__(self, ch, use_conv):
        super().__init__()
        self.op = tnn.Conv2d(ch, ch, 3, stride=2, padding=1) if use_conv else tnn.AvgPool2d(2)

    def forward(self, x):
        return self.op(x)


class TUp(tnn.Module):
    def __init__(self, ch, use_conv):
        super().__init__()
        if use_conv:
            self.conv = tnn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        x = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class TSeq(tnn.Sequential):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TResBlock) else layer(x)
        return x


class TorchADM(tnn.Module):
    def __init__(self, cfg: ADMConfig):
        super().__init__()
        mc, emb_ch = cfg.model_channels, 4 * cfg.model_channels
        self.cfg = cfg
        self.time_embed = tnn.Sequential(
            tnn.Linear(mc, emb_ch), tnn.SiLU(), tnn.Linear(emb_ch, emb_ch)
        )
        if cfg.num_classes is not None:
            self.label_emb = tnn.Embedding(cfg.num_classes, emb_ch)

        def heads_down(c):
            return c // cfg.num_head_channels if cfg.num_head_channels else cfg.num_heads

        def heads_up(c):
            if cfg.num_head_channels:
                return c // cfg.num_head_channels
            return cfg.num_heads_upsample or cfg.num_heads

        ch = mc * cfg.channel_mult[0]
        self.input_blocks = tnn.ModuleList([TSeq(tnn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        chans, ds = [ch], 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [TResBlock(ch, emb_ch, mc * mult, cfg)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(TAttention(ch, heads_down(ch), cfg))
                self.input_blocks.append(TSeq(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(
                    TSeq(
                        TResBlock(ch, emb_ch, ch, cfg, down=True)
                        if cfg.resblock_updown
                        else TDown(ch, cfg.conv_resample)
                    )
                )
                chans.append(ch)
                ds *= 2
        self.middle_block = TSeq(
            TResBlock(ch, emb_ch, ch, cfg),
            TAttention(ch, heads_down(ch), cfg),
            TResBlock(ch, emb_ch, ch, cfg),
        )
        self.output_blocks = tnn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [TResBlock(ch + chans.pop(), emb_ch, mc * mult, cfg)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(TAttention(ch, heads_up(ch), cfg))
                if level and i == cfg.num_res_blocks:
                    layers.append(
                        TResBlock(ch, emb_ch, ch, cfg, up=True)
                        if cfg.resblock_updown
                        else TUp(ch, cfg.conv_resample)
                    )
                    ds //= 2
                self.output_blocks.append(TSeq(*layers))
        self.out = tnn.Sequential(
            tnn.GroupNorm(cfg.num_groups, ch),
            tnn.SiLU(),
            tnn.Conv2d(ch, cfg.out_channels, 3, padding=1),
        )

    def forward(self, t, x, y=None):  # LFM's call order
        emb = self.time_embed(_t_embedding(t, self.cfg.model_channels))
        if y is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


# --------------------------------------------------------------------------------------------------
# StyleGAN2-ADA "resnet" discriminator (unconditional), NCHW

_LRELU_GAIN = math.sqrt(2.0)


def _blur_filter(channels):
    """The [1, 3, 3, 1] outer product, normalised to sum 1, as a depthwise [C, 1, 4, 4] convolution
    weight."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    f = torch.outer(taps, taps)
    return (f / f.sum()).expand(channels, 1, 4, 4).contiguous()


class TEqualizedConv(tnn.Module):
    """k x k convolution, weights N(0, 1) scaled by 1/sqrt(fan_in) at run time; ``down=2``:
    zero-pad, blur, then the convolution at stride 2 (H x W -> H/2 x W/2); lrelu(0.2) * sqrt(2) or
    linear."""

    def __init__(self, in_ch, out_ch, k, down=1, bias=True, activation="lrelu"):
        super().__init__()
        self.k, self.down, self.activation = k, down, activation
        self.weight = tnn.Parameter(torch.randn(out_ch, in_ch, k, k))
        self.bias = tnn.Parameter(torch.zeros(out_ch)) if bias else None
        self.scale = 1.0 / math.sqrt(in_ch * k * k)
        if down == 2:
            self.register_buffer("blur", _blur_filter(in_ch), persistent=False)

    def forward(self, x):
        w = self.weight * self.scale
        if self.down == 2:
            p = (4 - 2) + (
                self.k - 1
            )  # total padding that makes blur + stride-2 conv halve H and W
            x = F.conv2d(F.pad(x, ((p + 1) // 2, p // 2) * 2), self.blur, groups=x.shape[1])
            x = F.conv2d(x, w, self.bias, stride=2)
        else:
            x = F.conv2d(x, w, self.bias, padding=self.k // 2)
        return F.leaky_relu(x, 0.2) * _LRELU_GAIN if self.activation == "lrelu" else x


class TEqualizedDense(tnn.Module):
    def __init__(self, in_f, out_f, activation="linear"):
        super().__init__()
        self.activation = activation
        self.weight = tnn.Parameter(torch.randn(out_f, in_f))
        self.bias = tnn.Parameter(torch.zeros(out_f))
        self.scale = 1.0 / math.sqrt(in_f)

    def forward(self, x):
        x = F.linear(x, self.weight * self.scale, self.bias)
        return F.leaky_relu(x, 0.2) * _LRELU_GAIN if self.activation == "lrelu" else x


class TDiscriminatorBlock(tnn.Module):
    def __init__(self, in_ch, tmp_ch, out_ch):
        super().__init__()
        self.skip = TEqualizedConv(in_ch, out_ch, 1, down=2, bias=False, activation="linear")
        self.conv0 = TEqualizedConv(in_ch, tmp_ch, 3)
        self.conv1 = TEqualizedConv(tmp_ch, out_ch, 3, down=2)

    def forward(self, x):
        return (self.skip(x) + self.conv1(self.conv0(x))) * math.sqrt(0.5)


def minibatch_stddev(x, group_size):
    """One stddev channel; groups are strided (sample n is in group n % (B / G)), as StyleGAN2's."""
    b, c, h, w = x.shape
    g = min(group_size, b)
    y = x.reshape(g, b // g, c, h, w)
    y = (y - y.mean(dim=0)).square().mean(dim=0).add(1e-8).sqrt()  # [M, C, H, W]
    y = y.mean(dim=(1, 2, 3)).repeat(g)  # [B]
    return torch.cat([x, y[:, None, None, None].expand(b, 1, h, w)], dim=1)


class TorchStyleGANDiscriminator(tnn.Module):
    """x [B, C, R, R] -> logits [B]. Module names follow ``models/discriminators.py`` (fromrgb,
    b<res>, b4_conv, b4_fc, b4_out); ``b4_fc`` reads the 4x4 map flattened in NCHW order."""

    def __init__(self, resolution, in_channels, channel_base, channel_max, mbstd_group_size=4):
        super().__init__()
        channels = lambda res: min(channel_base // res, channel_max)  # noqa: E731
        self.mbstd_group_size = mbstd_group_size
        self.fromrgb = TEqualizedConv(in_channels, channels(resolution), 1)
        self.blocks = tnn.ModuleDict()
        res = resolution
        while res >= 8:
            self.blocks[f"b{res}"] = TDiscriminatorBlock(
                channels(res), channels(res), channels(res // 2)
            )
            res //= 2
        c4 = channels(4)
        self.b4_conv = TEqualizedConv(c4 + 1, c4, 3)
        self.b4_fc = TEqualizedDense(c4 * 16, c4, activation="lrelu")
        self.b4_out = TEqualizedDense(c4, 1)

    def forward(self, x):
        x = self.fromrgb(x)
        for block in self.blocks.values():
            x = block(x)
        x = self.b4_conv(minibatch_stddev(x, self.mbstd_group_size))
        return self.b4_out(self.b4_fc(x.flatten(1)))[:, 0]
