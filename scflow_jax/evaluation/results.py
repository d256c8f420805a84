"""The evaluation table shared by every task: its row keys and its printed form."""

from __future__ import annotations

# Every row: the model, how it was sampled, its metrics (None where a task does not measure one)
# and how many samples they are over. Tasks add their own keys (digits: fd, accuracy; the latent
# recipes: fid, clip_score, clip_cosine, provenance).
RESULT_KEYS = ("model", "sampler", "steps", "cfg", "fd", "accuracy", "num_samples")

# (key, header, width, format) of the metric columns; a column shows when some row has a value
# for it, so the digits table keeps FD/accuracy and the latent recipes' table shows FID/CLIP score.
METRIC_COLUMNS = (
    ("fd", "FD", 9, ".4f"),
    ("accuracy", "accuracy", 9, ".4f"),
    ("fid", "FID", 9, ".3f"),
    ("clip_score", "CLIP", 7, ".2f"),
    ("clip_cosine", "CLIP cos", 8, ".4f"),
)


def format_table(rows: list[dict]) -> str:
    columns = [c for c in METRIC_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    header = (
        f"{'model':<8} {'sampler':<7} {'steps':>5} {'cfg':>5} "
        + " ".join(f"{title:>{width}}" for _, title, width, _ in columns)
        + f" {'n':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        values = " ".join(
            f"{'-':>{width}}" if r.get(key) is None else f"{r[key]:>{width}{fmt}}"
            for key, _, width, fmt in columns
        )
        lines.append(
            f"{r['model']:<8} {r['sampler']:<7} {r['steps']:>5} {r['cfg']:>5.2f} {values} "
            f"{r['num_samples']:>6}"
        )
    return "\n".join(lines)
