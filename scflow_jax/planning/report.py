"""A plan as one table of GiB per device, from the plan's JSON record."""

from __future__ import annotations

# Rows of the table: the parts of the distill state (DistillState's fields, and the frozen teacher
# held beside it) as a reader thinks of them. A field not named here shows as "other state".
STATE_ROWS = (
    ("student parameters", ("params",)),
    ("student optimizer moments", ("opt_state",)),
    ("target + eval EMAs", ("target_params", "ema_params")),
    ("teacher (frozen)", ("teacher",)),
    ("discriminator + its moments", ("disc_params", "disc_opt_state")),
    ("student, held whole", ("student",)),  # the sampler's
)
_WIDTH = 44


def state_rows(state_gib: dict) -> list[tuple[str, float]]:
    rows, named = [], set()
    for label, fields in STATE_ROWS:
        present = [f for f in fields if f in state_gib]
        if present:
            rows.append((label, sum(state_gib[f] for f in present)))
            named.update(present)
    other = sum(v for k, v in state_gib.items() if k not in named)
    if other >= 0.005:
        rows.append(("other state", other))
    return rows


def _line(label: str, value: str) -> str:
    return f"  {label:<{_WIDTH}} {value:>16}"


def format_table(record: dict) -> str:
    """The plan ``record`` (plan_mode.plan's result) as text: state per device by part, the
    inputs, the compiler's temporaries, the total against the device's usable memory, and whether
    it fits."""
    gib = record["gib_per_device"]
    mesh = record["mesh"]
    # Tiny networks' plans read in MiB; a real network's in GiB.
    unit, scale = ("GiB", 1.0) if gib["total"] >= 1 else ("MiB", 1024.0)

    def amount(value: float) -> str:
        return f"{value * scale:.2f}"

    head = (
        f"Plan of the {record['program'].replace('_', ' ')} of {record['data']}: "
        f"batch {record['batch']} ({record['batch_per_device']:g} per device) on "
        f"{record['devices']} x {record['device_kind']} [{record['target']}], "
        f"mesh data {mesh['data']} x fsdp {mesh['fsdp']}, {record['compute_dtype']} compute, "
        f"remat {record['remat']}"
    )
    lines = [head, _line("", f"{unit} per device")]
    lines += [_line(label, amount(value)) for label, value in state_rows(gib["state"])]
    lines.append(_line("state", amount(gib["state_total"])))
    lines.append(_line("batch and conditions", amount(gib["inputs"])))
    compiled = record.get("xla")
    if compiled is None:
        lines.append(_line("temporaries", "not compiled"))
    elif "refused" in compiled:
        label = (
            f"temporaries, least reached ({record['compiler']} refused under "
            f"{compiled['limit_gib'] * scale:.0f})"
        )
        lines.append(_line(label, amount(gib["temporaries"])))
    else:
        lines.append(_line(f"temporaries ({record['compiler']})", amount(gib["temporaries"])))
        if gib["outputs_not_aliased"] * scale >= 0.005:
            lines.append(
                _line("outputs not aliased to the state", amount(gib["outputs_not_aliased"]))
            )
    lines.append(_line("total", amount(gib["total"])))
    lines.append(_line(f"usable: {record['usable_source']}", amount(record["usable_gib"])))
    left = record["left_gib"]
    verdict = f"yes, {amount(left)} left" if left >= 0 else f"no, {amount(-left)} short"
    lines.append(
        _line("fits" if record["fits"] is not None else "state fits (step not compiled)", verdict)
    )
    return "\n".join(lines)
