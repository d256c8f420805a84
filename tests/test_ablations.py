"""benchmarks/ablations.py: the multi-seed summary's arithmetic, and one tiny run through the real
stages."""

import os
import statistics
import sys

import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
)
import ablations  # noqa: E402


def _row(model, steps, cfg, fd, acc):
    return {"model": model, "steps": steps, "cfg": cfg, "fd": fd, "accuracy": acc}


def test_summary_is_mean_and_sample_std_per_row():
    tables = {
        0: [_row("teacher", 8, 1.0, 8.0, 0.99), _row("student", 1, 1.0, 6.0, 0.97)],
        2: [_row("student", 1, 1.0, 7.0, 0.95), _row("teacher", 8, 1.0, 9.0, 0.98)],
        1: [_row("teacher", 8, 1.0, 7.0, 1.0), _row("student", 1, 1.0, 8.0, 0.96)],
    }
    rows = ablations.summarize(tables)
    assert [(r["model"], r["steps"]) for r in rows] == [
        ("teacher", 8),
        ("student", 1),
    ]  # seed 0's order
    student = rows[1]
    assert student["seeds"] == [0, 1, 2] and student["fd"]["values"] == [6.0, 8.0, 7.0]
    assert student["fd"]["mean"] == pytest.approx(7.0)
    assert (
        student["fd"]["std"]
        == pytest.approx(statistics.stdev([6.0, 8.0, 7.0]))
        == pytest.approx(1.0)
    )
    assert student["accuracy"]["mean"] == pytest.approx(0.96)
    table = ablations.format_summary(rows)
    assert "| student | 1 | 1.0 | 7.00 ± 1.00 | 0.960 ± 0.010 |" in table
    one_seed = ablations.summarize({5: [_row("student", 2, 1.0, 5.5, 0.9)]})
    assert one_seed[0]["fd"] == {"mean": 5.5, "std": 0.0, "values": [5.5]}


def test_a_row_missing_for_one_seed_is_named():
    with pytest.raises(ValueError, match="student 2 steps cfg 1"):
        ablations.summarize(
            {0: [_row("student", 2, 1.0, 1.0, 1.0)], 1: [_row("student", 1, 1.0, 1.0, 1.0)]}
        )


# Two teachers, four distillations and evaluations: the suite's longest test (about 2.5 minutes
# of a worker), so it runs with the other minutes-long end-to-end runs in `make test-heavy`.
@pytest.mark.heavy
def test_tiny_two_seeds_two_variants(tmp_path, tiny_config):
    tiny_config.mesh.num_devices = 1
    tables = {}
    for seed in (0, 1):
        tables[seed] = ablations.run_seed(
            tiny_config, seed, ["scflow", "consistency_only"], str(tmp_path)
        )
    # The full variant also has the teacher rows; the others the student's only.
    full = tables[0]["scflow"]
    assert {r["model"] for r in full} == {"teacher", "student"}
    assert {r["model"] for r in tables[0]["consistency_only"]} == {"student"}
    # Reseeded: the two seeds' teachers (and so their rows) differ.
    teacher_fd = [
        next(r["fd"] for r in tables[s]["scflow"] if r["model"] == "teacher") for s in (0, 1)
    ]
    assert teacher_fd[0] != teacher_fd[1]
    summary = ablations.summarize({s: tables[s]["consistency_only"] for s in (0, 1)})
    assert [r["steps"] for r in summary] == list(tiny_config.eval.student_steps)
    # Resuming: a second call reads the finished runs instead of redoing them.
    before = os.path.getmtime(tmp_path / "seed0" / "scflow" / "eval" / "results.json")
    again = ablations.run_seed(tiny_config, 0, ["scflow"], str(tmp_path))
    assert again["scflow"] == full
    assert os.path.getmtime(tmp_path / "seed0" / "scflow" / "eval" / "results.json") == before
