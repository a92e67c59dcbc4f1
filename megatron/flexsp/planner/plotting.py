"""Draw a plan on a rank/time chart (PNG via matplotlib, imported only when drawing).

Each micro-batch starts when the previous one ends (its slowest group); inside it, every group
is a bar over its ranks, as long as its estimated time, coloured by degree and hatched by its
recompute mode (none: plain, selective: //, full: xx). Idle time of a group is the gap to the
micro-batch's end, which is what FlexSP's balancing shrinks.
"""

from __future__ import annotations

from pathlib import Path

from .costmodel import CostModel
from .plan import Plan, micro_batch_ms

__all__ = ["plot_plan"]

HATCH = {"none": "", "selective": "//", "full": "xx"}


def _legend(plan: Plan, colour: dict, Patch) -> list:
    """A patch per degree, and per recompute mode when a group recomputes."""
    modes = [m for m in HATCH if any(g.recompute == m for mb in plan.micro_batches for g in mb.groups)]
    handles = [Patch(color=c, label=f"degree {d}") for d, c in colour.items()]
    if modes != ["none"]:
        handles += [Patch(facecolor="white", edgecolor="black", hatch=HATCH[m], label=f"recompute {m}") for m in modes]
    return handles


def plot_plan(plan: Plan, cost: CostModel, path: str | Path, title: str | None = None) -> Path:
    """Write the chart of ``plan`` to ``path`` (PNG) and return the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as e:  # pragma: no cover - matplotlib is in the [plot] and [dev] extras
        raise RuntimeError("plotting needs matplotlib: pip install 'flexsp-megatron[plot]'") from e
    degrees = sorted({g.degree for mb in plan.micro_batches for g in mb.groups})
    cmap = plt.get_cmap("viridis", max(len(degrees), 2))
    colour = {d: cmap(k) for k, d in enumerate(degrees)}
    ws = plan.num_units  # rows are the planning ranks: units of TP t GPUs at t > 1
    fig, ax = plt.subplots(figsize=(11, max(3.0, min(12.0, 0.12 * ws + 2))))
    t0 = 0.0
    for mb in plan.micro_batches:
        for g in mb.groups:
            if not g.sequences:
                continue
            t = cost.group_time_ms([plan.lengths[s] for s in g.sequences], g.degree, g.recompute)
            lo, hi = min(g.ranks), max(g.ranks) + 1
            ax.barh(
                lo,
                t / 1000.0,
                height=hi - lo,
                left=t0 / 1000.0,
                align="edge",
                color=colour[g.degree],
                hatch=HATCH[g.recompute],
                edgecolor="black",
                linewidth=0.3,
            )
            if ws <= 64 and hi - lo >= 2:
                ax.text(
                    (t0 + t / 2) / 1000.0,
                    (lo + hi) / 2,
                    str(len(g.sequences)),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white",
                )
        t0 += micro_batch_ms(mb, plan.lengths, cost)
        ax.axvline(t0 / 1000.0, color="red", linewidth=0.6)
    ax.set_xlim(0, max(t0, 1e-9) / 1000.0)
    ax.set_ylim(ws, 0)
    ax.set_xlabel("estimated time (s); red lines end micro-batches")
    t = plan.tensor_parallel_size
    ax.set_ylabel("rank" if t == 1 else f"unit ({t} GPUs each)")
    ax.legend(handles=_legend(plan, colour, Patch), loc="lower right", fontsize=7)
    ax.set_title(
        title
        or f"{plan.solver.method}: {len(plan.lengths)} sequences, {plan.num_micro_batches} micro-batches, {t0:.0f} ms"
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
