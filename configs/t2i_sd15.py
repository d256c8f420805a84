"""SCFlow recipe: text-to-image distillation of an SD 1.5-family rectified-flow UNet (SCFLOW_SPEC.md
section 7).

Teacher: InstaFlow-0.9B (``XCLiu/instaflow_0_9B_from_sd_1_5``, a diffusers pipeline folder; the
2-rectified flow from SD 1.5 fits too), guided with CFG 1.5 against the empty prompt; VAE, CLIP
ViT-L/14 text encoder and tokenizer from the same pipeline folder (or
``openai/clip-vit-large-patch14``). Latents 4x64x64 (512 px); discriminator: the teacher UNet's
encoder + head of spec section 5, fed noised inputs at t-minus and the prompt states.

Usage (paths are local; nothing is downloaded; the four model paths may all be the pipeline folder):
  python -m scflow_jax.main --config=configs/t2i_sd15.py --workdir=runs/t2i \
      --config.model.teacher_path=P --config.model.vae_path=P --config.model.text_encoder_path=P \
      --config.model.tokenizer_path=P --config.data.path=.../laion_latents --mode=distill
``:tiny`` shrinks everything for CPU tests (a test writes tiny random weights in the real formats
and sets the paths).
"""

from __future__ import annotations

from ml_collections.config_dict import placeholder

from scflow_jax.default_config import _optimizer, latent_recipe_base


def get_config(arg: str | None = None):
    c = latent_recipe_base("t2i_sd15", "text_to_image")
    c.data.image_size = 512
    # Flipping a picture would contradict captions that say "left"/"right" or show text.
    c.data.hflip = False
    # The UNet architecture comes from <teacher_path>/[unet/]config.json (SD 1.5: ~860M parameters).
    c.model.text_encoder_path = placeholder(
        str
    )  # CLIP ViT-L/14 text transformer (pipeline or text_encoder/)
    c.model.tokenizer_path = placeholder(str)  # CLIP tokenizer (pipeline or tokenizer/)
    # bf16 compute with float32 master weights, and gradient checkpointing of every resnet and
    # transformer block, for the student/teacher UNet and the UNet-encoder discriminator alike.
    c.precision.compute_dtype = "bfloat16"
    c.model.remat = "full"
    # Teacher encoder + the authors' head: conv(1280->256, k4, s2, no padding) -> GroupNorm(32)
    # -> SiLU -> linear (2304 -> 1); the GAN losses take its sigmoid (the UNet-encoder D family's
    # convention).
    c.disc = dict(
        head_channels=256,
        head_groups=32,
        optimizer=_optimizer(1e-5, b1=0.9, b2=0.999, weight_decay=1e-2),
    )
    # 20 per GPU x 2 GPUs, ~18k steps.
    c.distill = dict(
        num_steps=18_000,
        batch_size=40,
        teacher_params="",
        optimizer=_optimizer(1e-5, b1=0.9, b2=0.999, weight_decay=1e-2),
        log_every=50,
        checkpoint_every=1000,
        keep_checkpoints=2,
        sample_every=2000,
    )
    c.scflow.update(
        dict(
            init_threshold=0.1,
            trunc_threshold=0.1,
            warmup_rf=0,
            warmup_gan=500,
            warmup_inv=500,
            teacher_cfg=1.5,
            integer_timesteps=True,
            r1_gamma=0.0,
            disc_noise_inputs=True,
        )
    )
    c.sample.prompts = (
        "a photograph of an astronaut riding a horse",
        "a cozy cabin in a snowy forest at night, warm light in the windows",
    )
    c.sample.num_per_prompt = 4
    c.data.prepare.image_size = 512
    # Evaluation: zero-shot COCO 2017 val 5k captions
    # (config.eval.prompts_file = captions_val2017.json; FID-5k against COCO val2017 statistics,
    # CLIP score with config.eval.clip_path = openai/clip-vit-large-patch14); COCO 2014 30k:
    # prompts_file = captions_val2014.json, num_samples = 30000. The teacher row: InstaFlow is
    # itself a one-step model (1 step, no guidance); for a 2-rectified-flow teacher use
    # teacher_steps=(25,).
    c.eval.update(
        dict(
            num_samples=5000,
            batch_size=64,
            student_steps=(1, 2, 4),
            teacher_steps=(1,),
            teacher_guidance=1.0,
        )
    )

    if arg == "tiny":
        c.mesh.num_devices = 1
        c.data.image_size = 64  # 8x8 latents
        c.plan.tiny_networks = True  # --mode=plan without model folders: tiny stand-ins
        c.precision.compute_dtype = "float32"
        c.model.remat = "none"
        c.disc.update(dict(head_channels=16, head_groups=4))
        c.distill.update(
            dict(num_steps=3, batch_size=4, log_every=1, checkpoint_every=3, sample_every=0)
        )
        c.scflow.update(dict(warmup_gan=1, warmup_inv=2))
        c.sample.update(
            dict(num_steps=(1, 2), batch_size=4, num_per_prompt=2, prompts=("a cat", "the dog"))
        )
        c.eval.update(dict(num_samples=8, batch_size=4, student_steps=(1, 2), teacher_steps=()))
        c.data.prepare.update(dict(image_size=64, batch_size=4))
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; expected '' or 'tiny'")
    return c
