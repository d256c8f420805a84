"""The tiny diffusers AutoencoderKL of the VAE and data-preparation tests (not a test module)."""

# Two levels (one downsample), 8/16 channels, one resnet per level: a few thousand parameters.
TINY = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=16,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)


def torch_vae(seed=0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(
        **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}
    ).eval()
    # diffusers zero-inits nothing here, but norms are 1/0: randomise every tensor.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return model
