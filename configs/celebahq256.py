"""SCFlow recipe: unconditional CelebA-HQ 256 in SD-VAE latents (SCFLOW_SPEC.md section 7).

Teacher: LFM ``celeb256_f8_adm`` (``model_480.pth``, VinAIResearch/LFM releases), an ADM UNet
trained with latent flow matching on ``stabilityai/sd-vae-ft-mse`` latents (x 0.18215, 4x32x32).
Discriminator: the StyleGAN2 latent discriminator of spec section 5.

Usage (paths are local; nothing is downloaded):
  python -m scflow_jax.main --config=configs/celebahq256.py --workdir=runs/celeba \
      --config.model.teacher_path=.../model_480.pth --config.model.vae_path=.../sd-vae-ft-mse \
      --config.data.path=.../celebahq256_latents --mode=distill
``:tiny`` shrinks every network and stage for CPU tests (a test writes tiny random weights in the
real formats and sets the paths).
"""

from __future__ import annotations

from scflow_jax.default_config import _optimizer, latent_recipe_base


def get_config(arg: str | None = None):
    c = latent_recipe_base("celebahq256", "latents")
    c.data.image_size = 256
    c.data.hflip = True
    c.model.teacher_subkey = (
        ""  # "model_dict" for LFM's resumable content.pth; "" for model_<epoch>.pth
    )
    # LFM celeb256_f8_adm = unet_adm.ADMConfig.lfm_celeba256(): attention at downsample factors 16
    # and 8 as LFM passes them (only factor 8, the 4x4 level, exists on 32x32 latents) plus the
    # middle block.
    c.model.adm = dict(
        model_channels=256,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16, 8),
        num_heads=4,
        use_scale_shift_norm=True,
        dropout=0.0,
        num_groups=32,
    )
    # StyleGAN2-ADA resnet D on 32x32 latents: blocks at 32, 16, 8 (512 channels), 4x4 epilogue.
    c.disc = dict(
        channel_base=16384,
        channel_max=512,
        mbstd_group_size=4,
        optimizer=_optimizer(1e-4, b1=0.9, b2=0.999, weight_decay=0.0),
    )
    # 32 per GPU x 2 GPUs; 200 epochs of CelebA-HQ's 30,000 images at 64 per step = 93,750 steps.
    c.distill = dict(
        num_steps=93_750,
        batch_size=64,
        teacher_params="",
        optimizer=_optimizer(2e-5, b1=0.9, b2=0.999, weight_decay=0.0),
        log_every=100,
        checkpoint_every=2000,
        keep_checkpoints=2,
        sample_every=5000,
    )
    c.scflow.update(
        dict(
            init_threshold=0.1,
            trunc_threshold=0.4,
            warmup_rf=1000,
            warmup_gan=0,
            warmup_inv=1000,
            teacher_cfg=1.0,
            integer_timesteps=False,
            r1_gamma=1.0,
            disc_noise_inputs=False,
        )
    )
    c.sample.num_images = 64
    c.data.prepare.image_size = 256
    # Evaluation: FID of 50k samples at 1/2/4 Euler steps against CelebA-HQ 256 statistics
    # (config.eval.fid_reference, written by --mode=fid_stats; pytorch-fid Inception at
    # config.fid.inception_path).
    c.eval.update(dict(num_samples=50_000, batch_size=256, student_steps=(1, 2, 4)))

    if arg == "tiny":
        c.mesh.num_devices = 1
        c.data.image_size = 64  # 8x8 latents (the tiny VAE downsamples 8x, as SD's)
        c.plan.tiny_networks = True  # --mode=plan without model folders: tiny stand-ins
        c.model.adm = dict(
            model_channels=16,
            channel_mult=(1,),
            num_res_blocks=1,
            attention_resolutions=(),
            num_heads=2,
            use_scale_shift_norm=True,
            dropout=0.0,
            num_groups=4,
        )
        c.disc.channel_base = 64
        c.disc.channel_max = 16
        c.distill.update(
            dict(num_steps=3, batch_size=4, log_every=1, checkpoint_every=3, sample_every=0)
        )
        c.scflow.update(dict(warmup_rf=1, warmup_inv=2))
        c.sample.update(dict(num_steps=(1, 2), num_images=4, batch_size=4))
        c.eval.update(dict(num_samples=8, batch_size=4, student_steps=(1, 2)))
        c.data.prepare.update(dict(image_size=64, batch_size=4))
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; expected '' or 'tiny'")
    return c
