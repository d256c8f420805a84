"""The embedded default: scikit-learn digits as a tiny text-to-image task.

``get_config()`` is the demo run (teacher training, SCFlow distillation, evaluation within
minutes on a 2-core CPU). ``get_config("tiny")`` shrinks every stage for tests.
The SCFlow settings follow SCFLOW_SPEC.md; where this small scale needs other values than
the paper's recipes (learning rates, step counts, the eval-EMA rate), the comment says why.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def _optimizer(
    lr: float, *, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=0.0, lr_warmup_steps=0
) -> dict:
    return dict(
        learning_rate=lr,
        b1=b1,
        b2=b2,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        lr_warmup_steps=lr_warmup_steps,
    )


def _prepare_fields(kind: str) -> dict:
    """--mode=prepare_data: images (+ captions) -> latent array_record shards (data/prepare.py).
    input: a folder, LMDB, .parquet, webdataset .tar or tfds:NAME[/CONFIG][:SPLIT]; image_column
    and caption_column name the parquet columns or TFDS features; tfds_data_dir: where the TFDS
    dataset was built (unset: TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets)."""
    return dict(
        kind=kind,
        input=placeholder(str),
        output=placeholder(str),
        vae=placeholder(str),
        text_encoder=placeholder(str),
        tokenizer=placeholder(str),
        image_size=placeholder(int),
        batch_size=64,
        examples_per_shard=1024,
        latent_dtype="float32",
        image_column="image",
        caption_column="caption",
        tfds_data_dir=placeholder(str),
        num_workers=8,
    )


def latent_recipe_base(name: str, data_kind: str) -> ml_collections.ConfigDict:
    """Fields every latent recipe (configs/celebahq256.py, configs/t2i_sd15.py) shares; each
    recipe sets its own values of SCFLOW_SPEC.md section 7 on top. Paths are placeholders:
    a stage that needs one and finds it unset names the field."""
    default = get_config()
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Mesh, multi-host and precision groups as in the embedded default (see there).
    c.mesh, c.distributed, c.precision = default.mesh, default.distributed, default.precision
    c.plan = default.plan
    c.data = dict(
        name=name,
        path=placeholder(str),  # prepared latent dataset (data.prepare.output)
        image_size=256,
        hflip=True,
        prepare=_prepare_fields(data_kind),
    )
    # remat: none | full | a jax.checkpoint_policies name (precision.py); per-block in the
    # UNets, so "full" is diffusers-style gradient checkpointing.
    c.model = dict(teacher_path=placeholder(str), vae_path=placeholder(str), remat="none")
    c.scflow = dict(
        huber_c=0.01,
        lambda_con=1.0,
        lambda_rf=0.1,
        lambda_gan=0.1,
        lambda_inv=0.1,
        target_ema=0.9,
        eval_ema=0.9999,
        use_teacher=True,
        sigmoid_head=placeholder(bool),
    )  # None: the discriminator family's convention
    c.sample = dict(
        model="student",
        num_steps=(1, 2, 4),
        sampler="euler",
        guidance=1.0,
        batch_size=16,
        num_images=64,
        prompts=(),
        prompts_file=placeholder(str),
        num_per_prompt=4,
    )
    c.export = dict(output_dir=placeholder(str))  # default <workdir>/export
    # --mode=evaluate (evaluation/real_eval.py; its EVAL_DEFAULTS lists the fields).
    c.eval = dict(
        num_samples=50_000,
        batch_size=64,
        student_steps=(1, 2, 4),
        teacher_steps=(),
        teacher_guidance=1.0,
        student_params="",
        fid_reference=placeholder(str),
        clip_path=placeholder(str),
        prompts_file=placeholder(str),
        write_images=False,
        save_every=10,
    )
    c.fid = dict(
        inception_path=placeholder(str),
        images_dir=placeholder(str),
        output_npz=placeholder(str),
        batch_size=placeholder(int),
    )
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Devices form a (data, fsdp) mesh; the batch is split over both axes, parameters of at
    # least fsdp_min_size elements over fsdp (sharding.py). -1: the remaining devices.
    # fsdp_strict: a large parameter the fsdp size cannot split is an error, not replicated.
    # overlap_collectives: on several GPUs, XLA's asynchronous collectives (overlapped with
    # compute, but the schedule keeps activations live: about twice the step's temporaries);
    # False runs them synchronously (xla_gpu.py). No effect on one device, CPU or TPU.
    c.mesh = dict(
        data=-1,
        fsdp=1,
        num_devices=-1,
        fsdp_min_size=2**16,
        fsdp_strict=False,
        overlap_collectives=False,
    )

    # Multi-host (distributed.py): used when main.py gets --multihost or enabled=True.
    # None: detected by JAX (Cloud TPU, SLURM). The timeout turns a missing coordinator or
    # missing processes into an error instead of a hang.
    c.distributed = dict(
        enabled=False,
        coordinator_address=placeholder(str),
        num_processes=placeholder(int),
        process_id=placeholder(int),
        initialization_timeout=300,
    )

    # Parameters stay float32 (optimizer and EMA precision); compute_dtype (float32 or
    # bfloat16) is the networks' activation/matmul dtype. Losses and outputs are float32.
    # decode_dtype is the VAE decoder's (latent recipes' samples and evaluation): float32 keeps
    # FID/CLIP comparable with float32 decodes; bfloat16 is the fast choice on accelerators.
    c.precision = dict(param_dtype="float32", compute_dtype="float32", decode_dtype="float32")

    c.data = dict(name="digits", heldout_fraction=0.2)
    c.data.prepare = _prepare_fields("latents")

    # Frozen CLIP-architecture text encoder with a seeded random init (nothing to download).
    c.text = dict(
        max_length=8,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        init_seed=1234,
    )

    c.model = dict(
        name="small_unet",
        channels=24,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        num_heads=4,
        # Rematerialisation of the networks' activations in the backward pass:
        # none | full | any jax.checkpoint_policies name (e.g. dots_saveable).
        remat="none",
    )

    c.teacher = dict(
        num_steps=1000,
        batch_size=64,
        cond_drop_prob=0.1,
        ema_rate=0.999,
        grad_accum_steps=1,  # microbatches per step (gradients averaged; same global batch)
        optimizer=_optimizer(1e-3, grad_clip=1.0, lr_warmup_steps=200),
        log_every=100,
        checkpoint_every=500,
        keep_checkpoints=2,
        # No grids while training: each costs a sampler compile (~5 s of the demo's 10-minute
        # budget) and the evaluation stage writes a grid for every row of its table.
        sample_every=0,
    )

    # Discriminator of SCFLOW_SPEC.md section 5 (StyleGAN2 resnet design), scaled to 8x8
    # pixels and conditioned on the prompt by projection. Learning rate 1e-3, not the CelebA
    # recipe's 1e-4: the equalized-lr layers store N(0, 1) weights, so Adam moves each by about
    # the learning rate per step, and at 1e-4 D hardly changes within this short run (its GAN
    # term then only adds noise; docs/performance.md has the ablation).
    c.disc = dict(
        channel_base=512,
        channel_max=64,
        mbstd_group_size=4,
        conditional=True,
        # The paper leaves D's learning rate to the recipe; at this scale and length a D at the
        # generator's rate stays at chance and the GAN term is noise; at 2.5e-3 it buys the
        # one-step quality (docs/performance.md, Ablations).
        optimizer=_optimizer(2.5e-3),
    )

    c.distill = dict(
        num_steps=600,  # the demo's 10-minute budget on a 2-core CPU
        batch_size=32,
        teacher_params="",  # default: <workdir>/teacher/params
        grad_accum_steps=1,  # only 1 is supported (see distill.validate_distill_config)
        optimizer=_optimizer(2e-4, grad_clip=1.0),
        log_every=50,
        checkpoint_every=300,
        keep_checkpoints=2,
        sample_every=0,  # as the teacher's
    )

    c.scflow = dict(
        init_threshold=0.1,  # delta: max local step
        trunc_threshold=0.4,  # tau: below it the real sample is the target
        huber_c=0.01,
        lambda_con=1.0,
        lambda_rf=0.1,
        lambda_gan=0.1,
        lambda_inv=0.1,
        warmup_rf=0,
        warmup_gan=0,
        warmup_inv=0,
        target_ema=0.9,
        # The paper's 0.9999 averages over ~10k steps; this short run needs a shorter window.
        eval_ema=0.99,
        teacher_cfg=1.0,
        integer_timesteps=False,
        use_teacher=True,  # False: consistency training without a teacher
        r1_gamma=1.0,
        # None: the discriminator family's convention (StyleGAN2 D: raw logits; the text-to-image
        # UNet-encoder D: sigmoid). True/False override it, as an ablation (logged).
        sigmoid_head=placeholder(bool),
        disc_noise_inputs=False,
    )

    # The teacher's rows are unguided, as the teacher the student is distilled from
    # (scflow.teacher_cfg); a guided row costs twice the network evaluations.
    c.eval = dict(
        num_samples=1000,
        batch_size=1000,
        teacher_steps=(1, 2, 4, 8, 32),
        teacher_guidance=1.0,
        student_steps=(1, 2, 4),
        classifier_steps=1500,
        grid_per_digit=10,
    )

    # --mode=fid_stats: reference FID statistics (mu, sigma) of a folder of images, pytorch-fid's
    # Inception.
    c.fid = dict(
        inception_path=placeholder(str),
        images_dir=placeholder(str),
        output_npz=placeholder(str),
        batch_size=placeholder(int),
    )

    c.sample = dict(
        num_steps=1, guidance=1.0, num_per_prompt=8, prompts=("",), model="student", sampler="euler"
    )

    # --mode=plan (scflow_jax/planning, docs/planning.md): does the distill step fit the target's
    # devices at config.distill.batch_size under config.mesh? target: "" this host's devices,
    # cpu[:N], a GPU h100[:N] / a100-80g / h200 / a GpuTargetConfig .txtpb, or a TPU slice such as
    # v5e:2x4. output: the JSON record ("" = <workdir>/plan.json). compile=False plans the state
    # alone. memory_gib > 0 replaces the device's usable memory; tpu_hbm_cap_mib > 0 lowers
    # XLA:TPU's limit so that it refuses early with its least temporaries; sampler_steps > 0 plans
    # the evaluation sampler of that many Euler steps (at config.eval.batch_size) instead.
    # tiny_networks: a recipe whose model folders are not set plans tiny stand-ins of its
    # networks instead of the reference ones (its :tiny variant sets it).
    c.plan = dict(
        target="",
        output="",
        compile=True,
        memory_gib=0.0,
        tpu_hbm_cap_mib=0,
        sampler_steps=0,
        tiny_networks=False,
    )

    if arg == "tiny":
        # One resolution level and attention only in the middle block: a small graph, so the
        # distillation step compiles in seconds rather than a minute on a 2-core CPU.
        c.model.channels = 16
        c.model.channel_mult = (1,)
        c.model.attention_levels = ()
        c.text.hidden_size = 16
        c.teacher.num_steps = 6
        c.teacher.batch_size = 16
        c.teacher.log_every = 2
        c.teacher.checkpoint_every = 3
        c.distill.num_steps = 4
        c.distill.batch_size = 16
        c.distill.log_every = 2
        c.distill.checkpoint_every = 2
        c.disc.channel_base = 64
        c.disc.channel_max = 16
        c.eval.num_samples = 40
        c.eval.batch_size = 16  # divides 8 devices; 40 samples leave a ragged last batch
        c.eval.teacher_steps = (1, 2)
        c.eval.teacher_guidance = 1.5  # the guided rows' path stays exercised
        c.eval.student_steps = (1, 2)
        c.eval.classifier_steps = 50
        c.eval.grid_per_digit = 2
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; expected '' or 'tiny'")
    return c
