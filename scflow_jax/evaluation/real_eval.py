"""The latent recipes' evaluation (``LatentTask.evaluate``, --mode=evaluate): FID and CLIP score
tables for CelebA-HQ 256 and text-to-image.

Rows: the student (the eval EMA exported at ``<workdir>/distill/params``) at each of
``config.eval.student_steps`` Euler steps without guidance, and the teacher at each of
``config.eval.teacher_steps`` with ``config.eval.teacher_guidance``. Each row generates
``config.eval.num_samples`` images (generate.py: per-sample seeds, sharded batches, exact ragged
last batch) and streams them, batch by batch, into

* FID: pytorch-fid Inception pool features (``config.fid.inception_path``), float64 running
  statistics, compared with the reference ``config.eval.fid_reference`` (``.npz`` with
  ``mu``/``sigma``, e.g. from ``--mode=fid_stats``);
* CLIP score (text-to-image only, ``config.eval.clip_path``, a transformers CLIP folder with its
  tokenizer): ``clip_score`` = 100 x mean max(cos, 0) (torchmetrics' definition) and ``clip_cosine``
  = mean cosine, the 0-1 form the InstaFlow/SCFlow papers quote (0.304 for InstaFlow-0.9B 1 step).

Resumable: every ``config.eval.save_every`` batches a row saves its FID statistics, CLIP-score sums
and batch count to ``<workdir>/eval/state/<row>.npz`` (atomically, with a fingerprint of the job; a
state saved for another job is refused). A rerun continues from there; a finished row is not
regenerated. Each finished row is written into ``<workdir>/eval/results.json`` (replacing an older
row of the same name), in the schema of the embedded default (results.RESULT_KEYS;
``fd``/``accuracy`` are null here) plus ``fid``, ``clip_score``, ``clip_cosine`` and provenance
(``row``, ``fid_reference``, ``prompts_file``).

Prompts (text-to-image): ``config.eval.prompts_file`` (prompts.py formats; the first ``num_samples``
prompts, -1 = all); sample i is conditioned on prompt i. ``config.eval.write_images`` writes every
sample to ``<workdir>/eval/images/<row>/<index:06d>.png``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from typing import Callable, Optional

import jax
import numpy as np
from absl import logging
from etils import epath

from scflow_jax import checkpoint, layout, monitoring, precision, sharding
from scflow_jax.evaluation import fid, frechet, generate, inception, prompts as prompts_lib, results
from scflow_jax.evaluation.clip_score import CLIPScoreAccumulator, clip_cosines

__all__ = [
    "EVAL_DEFAULTS",
    "RowAccumulator",
    "row_name",
    "validate_eval_config",
    "upsert_results",
    "evaluate_recipe",
    "is_done",
]

SAMPLER = "euler"
PROGRESS_EVERY_S = 30.0

# config.eval fields this stage reads, with the defaults used when a config leaves one out. The
# recipe configs should list them all (a locked config only accepts --config.eval.x=... overrides of
# listed fields).
EVAL_DEFAULTS = dict(
    num_samples=50000,  # -1 (text-to-image): one sample per prompt
    batch_size=64,  # global; a multiple of the device count
    student_steps=(1, 2, 4),
    teacher_steps=(25,),
    teacher_guidance=1.0,
    student_params="",  # default <workdir>/distill/params
    fid_reference=None,  # .npz (mu, sigma); None: no FID
    clip_path=None,  # transformers CLIP folder; None: no CLIP score (text-to-image only)
    prompts_file=None,  # text-to-image captions (prompts.py)
    write_images=False,
    save_every=10,  # batches between saved states
)


def _eval_field(config, name: str):
    value = config.eval.get(name, None)
    return EVAL_DEFAULTS[name] if value is None else value


def row_name(model: str, steps: int, guidance: float, num_samples: int) -> str:
    return f"{model}_{SAMPLER}_{steps}steps_cfg{guidance:g}_n{num_samples}"


# --------------------------------------------------------------------------------------------------
# Resumable per-row state


class RowAccumulator(fid.FIDAccumulator):
    """A row's FID statistics plus its CLIP-score sums, saved together in one ``.npz`` so they
    always describe the same batches."""

    _CLIP_KEYS = ("clip_sum_cosine", "clip_sum_clamped_cosine", "clip_count")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clip = CLIPScoreAccumulator()

    @classmethod
    def restore_or_create(
        cls, state_path: str, dim: int | None = None, *, save_every: int = 0, fingerprint: str = ""
    ) -> "RowAccumulator":
        acc = super().restore_or_create(
            state_path, dim, save_every=save_every, fingerprint=fingerprint
        )
        if epath.Path(state_path).exists():
            with frechet.read_npz(state_path) as data:
                missing = [k for k in cls._CLIP_KEYS if k not in data.files]
                if missing:
                    raise ValueError(
                        f"evaluation state {state_path} is missing key(s) {missing}; delete it to "
                        f"start the row over"
                    )
                acc.clip = CLIPScoreAccumulator(
                    float(data["clip_sum_cosine"]),
                    float(data["clip_sum_clamped_cosine"]),
                    int(data["clip_count"]),
                )
        return acc

    def add_batch(
        self, features: Optional[np.ndarray], cosines: Optional[np.ndarray] = None
    ) -> None:
        """One generated batch: its FID features and/or CLIP cosines (None: that metric is off)."""
        if features is not None:
            self.statistics.update(features)
        if cosines is not None:
            self.clip.update(cosines)
        self.num_batches += 1
        if self.save_every and self.num_batches % self.save_every == 0:
            self.save()

    def save(self) -> None:
        if monitoring.is_main_process():
            frechet.write_npz_atomic(
                self.state_path,
                num_batches=np.asarray(self.num_batches, np.int64),
                fingerprint=np.asarray(self.fingerprint),
                **self.statistics.state_dict(),
                clip_sum_cosine=np.float64(self.clip.sum_cosine),
                clip_sum_clamped_cosine=np.float64(self.clip.sum_clamped_cosine),
                clip_count=np.int64(self.clip.count),
            )


# --------------------------------------------------------------------------------------------------
# Config checks


def validate_eval_config(config, task, mesh, *, has_extractor: bool = False) -> None:
    """Clear errors, naming the field, before anything is loaded or generated."""
    if config.get("eval") is None:
        raise ValueError(
            "config.eval is missing; --mode=evaluate needs config.eval.* "
            "(see real_eval.EVAL_DEFAULTS)"
        )
    n = _eval_field(config, "num_samples")
    if task.unconditional and (not isinstance(n, int) or n < 2):
        raise ValueError(
            f"config.eval.num_samples={n!r} must be an integer >= 2 (FID needs a covariance)"
        )
    if not task.unconditional and not (n == -1 or (isinstance(n, int) and n >= 2)):
        raise ValueError(
            f"config.eval.num_samples={n!r} must be an integer >= 2, or -1 for one per prompt"
        )
    sharding.check_global_batch(_eval_field(config, "batch_size"), mesh, "config.eval.batch_size")
    for field in ("student_steps", "teacher_steps"):
        steps = _eval_field(config, field)
        if any(not isinstance(s, int) or s < 1 for s in steps):
            raise ValueError(f"config.eval.{field}={tuple(steps)} must hold positive integers")
    if not (_eval_field(config, "student_steps") or _eval_field(config, "teacher_steps")):
        raise ValueError(
            "config.eval.student_steps and config.eval.teacher_steps are both empty: no rows"
        )
    if _eval_field(config, "save_every") < 0:
        raise ValueError(
            f"config.eval.save_every={_eval_field(config, 'save_every')} must be >= 0 (0: never)"
        )
    guidance = float(_eval_field(config, "teacher_guidance"))
    reference, clip_path, prompts_file = (
        _eval_field(config, k) for k in ("fid_reference", "clip_path", "prompts_file")
    )
    if task.unconditional:
        if guidance != 1.0:
            raise ValueError(
                f"config.eval.teacher_guidance={guidance} needs a conditional model; this task is "
                f"unconditional (use 1.0)"
            )
        for field, value in (("clip_path", clip_path), ("prompts_file", prompts_file)):
            if value:
                raise ValueError(
                    f"config.eval.{field}={value!r} is set but this task is unconditional "
                    f"(no prompts, no CLIP score): unset it"
                )
    elif not prompts_file:
        raise ValueError(
            "config.eval.prompts_file must be set for a text-to-image evaluation (a JSON list, "
            "a COCO captions annotation file, or one prompt per line)"
        )
    if reference:
        if not os.path.isfile(reference):
            raise ValueError(
                f"config.eval.fid_reference={reference} is not a file (an .npz with mu and sigma, "
                f"e.g. written by --mode=fid_stats)"
            )
        if not has_extractor:
            path = config.get("fid", {}).get("inception_path", None)
            if not path or not os.path.isfile(path):
                raise ValueError(
                    f"config.fid.inception_path={path!r} must be pytorch-fid's Inception weights "
                    f"file to compute FID (config.eval.fid_reference is set)"
                )
    if clip_path and not os.path.isdir(clip_path):
        raise ValueError(
            f"config.eval.clip_path={clip_path} is not a folder (a transformers CLIP model with "
            f"its tokenizer, e.g. openai/clip-vit-large-patch14)"
        )
    if not reference and not clip_path:
        raise ValueError(
            "nothing to measure: set config.eval.fid_reference (FID) and/or config.eval.clip_path "
            "(CLIP score, text-to-image)"
        )


# --------------------------------------------------------------------------------------------------
# Results file


def upsert_results(workdir: str, rows: list[dict]) -> list[dict]:
    """Writes ``rows`` into ``<workdir>/eval/results.json`` (atomically), replacing older rows of
    the same ``row`` name and keeping every other row; returns the file's new content."""
    path = layout.results_path(workdir)
    existing = []
    if epath.Path(path).exists():
        try:
            existing = json.loads(epath.Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path} is not valid JSON ({e}); move it away to start a new results file"
            ) from None
        if not isinstance(existing, list):
            raise ValueError(f"{path} must hold a JSON list of result rows")
    names = {r["row"] for r in rows}
    merged = [r for r in existing if not (isinstance(r, dict) and r.get("row") in names)] + list(
        rows
    )
    if monitoring.is_main_process():
        monitoring.write_json_atomic(path, merged)
    return merged


# --------------------------------------------------------------------------------------------------
# The stage


class _CLIPScorer:
    """Per-sample CLIP cosines of a sharded image batch (padded to the batch size) and its
    captions."""

    def __init__(self, clip_path: str, mesh):
        from scflow_jax.models.clip import load_clip_tokenizer
        from scflow_jax.models.clip_vision import load_clip

        self.clip, params = load_clip(clip_path)
        self.params = sharding.put_replicated(params, mesh)
        self.tokenizer = load_clip_tokenizer(
            clip_path, max_length=self.clip.config.text.max_position_embeddings
        )
        self._mesh = mesh

    def __call__(self, images: jax.Array, captions: list[str]) -> np.ndarray:
        n, batch = len(captions), images.shape[0]
        ids, mask = self.tokenizer(captions + captions[-1:] * (batch - n))
        text = sharding.shard_global_batch({"ids": ids, "mask": mask}, self._mesh)
        return sharding.to_host(
            clip_cosines(self.clip, self.params, images, text["ids"], text["mask"])
        )[:n]


def _fingerprint(**fields) -> str:
    return " ".join(f"{k}={v}" for k, v in fields.items())


def _digest(strings: list[str]) -> str:
    return hashlib.sha256("\n".join(strings).encode()).hexdigest()[:16]


def _params_identity(path: str) -> str:
    # An exported parameter folder is renamed into place when complete: a new export has a new
    # mtime.
    return f"{os.path.abspath(path)}@{os.path.getmtime(path):.0f}"


def evaluate_recipe(
    config,
    workdir: str,
    task,
    *,
    feature_extractor: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    feature_dim: Optional[int] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
) -> list[dict]:
    """Generates and scores every row (see the module docstring); returns the rows of this run.

    ``feature_extractor`` (images [N, H, W, 3] in [0, 1] -> features [N, D]) replaces the Inception
    network (tests use a tiny one; ``feature_dim`` is its D, default Inception's 2048) and is
    fingerprinted as ``injected``.
    """
    mesh = mesh or sharding.mesh_from_config(config)
    task = precision.configure_task(task, config)  # compute dtype (bf16) of the sampled network
    validate_eval_config(config, task, mesh, has_extractor=feature_extractor is not None)
    get = functools.partial(_eval_field, config)
    batch_size, seed = int(get("batch_size")), int(config.seed)
    reference, clip_path = get("fid_reference"), get("clip_path")
    captions = None
    if not task.unconditional:
        captions = prompts_lib.prompts_for_samples(
            prompts_lib.load_prompts(get("prompts_file")),
            get("num_samples"),
            source=get("prompts_file"),
            field="config.eval.num_samples",
        )
    num_samples = len(captions) if captions is not None else int(get("num_samples"))
    total_batches = generate.num_batches(num_samples, batch_size)
    student_path = get("student_params") or layout.student_params_path(workdir)
    plan = [("student", s, 1.0) for s in get("student_steps")] + [
        ("teacher", s, float(get("teacher_guidance"))) for s in get("teacher_steps")
    ]
    if any(m == "student" for m, _, _ in plan) and not checkpoint.params_exist(student_path):
        raise FileNotFoundError(
            f"no student parameters at {student_path}: run --mode=distill first, set "
            f"config.eval.student_params, or set config.eval.student_steps=() to evaluate "
            f"the teacher only"
        )

    dim = (feature_dim or inception.FEATURE_DIM) if reference else None
    extractor_id = (
        "off"
        if not reference
        else "injected"
        if feature_extractor is not None
        else os.path.abspath(config.fid.inception_path)
    )
    # What a row's saved state depends on; a state saved for other values is refused, not mixed in.
    # The teacher's weights are named by config.model (the recipes keep their paths there).
    model_config = config.get("model", None)
    common = dict(
        model_config=_digest(
            [
                json.dumps(
                    model_config.to_dict() if model_config else None, sort_keys=True, default=str
                )
            ]
        ),
        sampler=SAMPLER,
        seed=seed,
        num_samples=num_samples,
        batch_size=batch_size,
        latent_shape=tuple(task.latent_shape),
        prompts="none" if captions is None else _digest(captions),
        fid=extractor_id,
        clip=os.path.abspath(clip_path) if clip_path else "off",
    )

    # Networks are loaded only when a row still has batches to generate, once each.
    @functools.cache
    def teacher_params():
        return sharding.put_replicated(task.load_teacher_params(), mesh)

    @functools.cache
    def student_params():
        load = getattr(task, "load_flow_params", None)
        if load is not None:
            return load(student_path, mesh, "student parameters")
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), teacher_params())
        return checkpoint.load_params(
            student_path,
            abstract,
            sharding.sampler_shardings(abstract, mesh),
            what="student parameters",
        )

    @functools.cache
    def extractor():
        return feature_extractor or fid.inception_feature_extractor(
            config.fid.inception_path, mesh, batch_size, field="config.eval.batch_size"
        )

    @functools.cache
    def scorer():
        return _CLIPScorer(clip_path, mesh)

    def cond_fn(indices):
        return (
            None
            if captions is None
            else np.asarray(task.encode_prompts([captions[i] for i in indices]))
        )

    rows = []
    for model, steps, guidance in plan:
        name = row_name(model, steps, guidance, num_samples)
        identity = (
            _params_identity(student_path) if model == "student" else "task.load_teacher_params"
        )
        acc = RowAccumulator.restore_or_create(
            os.path.join(layout.eval_dir(workdir), "state", f"{name}.npz"),
            dim,
            save_every=int(get("save_every")),
            fingerprint=_fingerprint(
                row=name, params=identity, steps=steps, cfg=guidance, **common
            ),
        )
        if acc.num_batches < total_batches:
            params = student_params() if model == "student" else teacher_params()
            sampler = generate.ShardedSampler(
                generate.euler_sample_fn(task.velocity_fn, num_steps=steps, guidance=guidance),
                params,
                latent_shape=task.latent_shape,
                seed=seed,
                batch_size=batch_size,
                mesh=mesh,
                null_cond=None if task.unconditional or guidance == 1.0 else task.null_cond,
                decode=task.decode,
                field="config.eval.batch_size",
            )
            image_dir = (
                os.path.join(layout.eval_dir(workdir), "images", name)
                if get("write_images")
                else None
            )
            _run_row(
                name,
                sampler,
                acc,
                total_batches,
                num_samples,
                cond_fn,
                captions,
                extractor if reference else None,
                scorer if clip_path else None,
                image_dir,
            )
        row = _finish_row(
            name,
            acc,
            num_samples,
            model=model,
            steps=steps,
            guidance=guidance,
            reference=reference,
            clip=bool(clip_path),
        )
        row["prompts_file"] = None if captions is None else os.path.abspath(get("prompts_file"))
        upsert_results(workdir, [row])
        rows.append(row)
        logging.info(
            "[evaluate] %s: FID %s, CLIP score %s (cosine %s) over %d samples",
            name,
            row["fid"],
            row["clip_score"],
            row["clip_cosine"],
            num_samples,
        )
    if monitoring.is_main_process():
        monitoring.write_json_atomic(_complete_path(workdir), [r["row"] for r in rows])
        print(results.format_table(rows), flush=True)
    return rows


def _run_row(
    name, sampler, acc, total_batches, num_samples, cond_fn, captions, extractor, scorer, image_dir
) -> None:
    """Generates batches ``acc.num_batches ..`` of a row into its accumulator; saves the final
    state. ``extractor``/``scorer`` build the metric networks (None: metric off), before the first
    batch so a bad weights file fails before minutes of sampling."""
    extract = extractor() if extractor else None
    score = scorer() if scorer else None
    start = acc.num_batches
    if start:
        logging.info(
            "[evaluate] %s: resuming at batch %d/%d (%d samples done)",
            name,
            start,
            total_batches,
            start * sampler.batch_size,
        )
    progress = monitoring.Progress(f"evaluate {name}", start, total_batches)
    last_report = time.perf_counter()
    for b in range(start, total_batches):
        indices = generate.batch_indices(b, num_samples, sampler.batch_size)
        images = sampler(indices, cond_fn(indices))  # [batch_size, ...] sharded, padding rows last
        host = sharding.to_host(images)[: len(indices)].astype(np.float32)
        features = None if extract is None else extract((host + 1.0) / 2.0)
        cosines = None if score is None else score(images, [captions[i] for i in indices])
        if image_dir:
            generate.write_pngs(image_dir, indices, host)
        acc.add_batch(features, cosines)
        now = time.perf_counter()
        if b + 1 == total_batches or now - last_report >= PROGRESS_EVERY_S or b == start:
            progress.report(b + 1, {"samples": float(indices[-1] + 1)})
            last_report = now
    if acc.state_path:
        acc.save()


def _finish_row(name, acc, num_samples, *, model, steps, guidance, reference, clip) -> dict:
    """The results row of a finished accumulator, after checking it counted every sample exactly
    once."""
    counts = {
        "FID statistics": acc.num_samples if reference else num_samples,
        "CLIP score": acc.clip.count if clip else num_samples,
    }
    for what, count in counts.items():
        if count != num_samples:
            raise RuntimeError(
                f"row {name}: {what} counted {count} samples, expected {num_samples} (state "
                f"{acc.state_path}; delete it to regenerate the row)"
            )
    row = {
        "model": model,
        "sampler": SAMPLER,
        "steps": int(steps),
        "cfg": float(guidance),
        "fd": None,
        "accuracy": None,
        "num_samples": num_samples,
        "fid": None,
        "clip_score": None,
        "clip_cosine": None,
        "row": name,
        "fid_reference": os.path.abspath(reference) if reference else None,
    }
    if reference:
        mu, sigma = acc.statistics.statistics()
        row["fid"] = fid.fid_against_reference(mu, sigma, reference)
    if clip:
        result = acc.clip.result()
        row["clip_score"], row["clip_cosine"] = result["clip_score"], result["mean_cosine"]
    return row


def _complete_path(workdir: str) -> str:
    return os.path.join(layout.eval_dir(workdir), "complete.json")


def is_done(workdir: str) -> bool:
    """Every row of a run finished (results.json alone also holds the rows of an interrupted
    one)."""
    return epath.Path(_complete_path(workdir)).is_file()
