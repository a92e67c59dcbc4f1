"""What flexsp-profile measured: the cost model, the samples behind it, and the file it writes.

Why apart: the report is read by people (``format``) and by the planner (the cost-model JSON,
with the samples kept beside it under "profile" so a fit can be checked later).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from megatron.flexsp.planner.costmodel import CostModel
from megatron.flexsp.planner.fitting import ComputeFit

__all__ = ["ProfileReport"]


@dataclass
class ProfileReport:
    cost_model: dict[str, Any]
    compute_fit: ComputeFit
    compute_samples: list[dict[str, Any]]
    alltoall: dict[int, dict[str, Any]]
    memory: dict[str, Any]
    environment: dict[str, Any] = field(default_factory=dict)

    def format(self) -> str:
        """Human-readable summary: samples against the fit, bandwidths, memory."""
        f = self.compute_fit
        lines = [
            f"compute fit (degree 1, {f.samples} samples): alpha1 {f.alpha1_ms_per_token2:.4g} ms/token^2, "
            f"alpha2 {f.alpha2_ms_per_token:.4g} ms/token, beta1 {f.beta1_ms:.4g} ms; "
            f"fit error rms {100 * f.rms_rel_err:.1f}%, max {100 * f.max_rel_err:.1f}%",
            f"  {'lengths':<28}{'measured ms':>12}{'fit ms':>10}{'error':>8}",
        ]
        for s in self.compute_samples:
            desc = f"{len(s['lengths'])} x {s['lengths'][0]}" if len(s["lengths"]) > 1 else str(s["lengths"][0])
            pred = f.predict(s["lengths"])
            lines.append(f"  {desc:<28}{s['ms']:>12.2f}{pred:>10.2f}{100 * (pred - s['ms']) / s['ms']:>7.1f}%")
        if self.alltoall:
            lines.append(
                f"  {'all-to-all degree':<20}{'GB/s (effective)':>18}{'GB/s (collective)':>19}{'tokens/rank':>14}"
            )
            for d, a in sorted(self.alltoall.items()):
                lines.append(
                    f"  {d:<20}{a['bandwidth_gbs']:>18.3f}{a['collective_gbs']:>19.3f}"
                    f"{','.join(str(x) for x in a['tokens_per_rank']):>14}"
                )
        m = self.memory
        lines.append(
            f"memory ({m['method']}): model states {m['model_states_mb']:.2f} MB (measured "
            f"{m['measured_states_mb']:.2f} + fixed {m['fixed_mb']:.2f}), activation "
            f"{m['activation_mb_per_token']:.5f} MB/token, limit {m['limit_gb']:.4g} GB -> "
            f"{m['tokens_per_gpu']} tokens per GPU"
        )
        for mode, e in (self.cost_model.get("recompute") or {}).items():
            lines.append(
                f"  recompute {mode}: activation {e['activation_mb_per_token']:.5f} MB/token, compute x"
                f"{e['compute_factor']:.3f}, all-to-all x{e['alltoall_factor']:.3f}"
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The cost-model JSON the planner reads, with the measurements under "profile"."""
        out = dict(self.cost_model)
        out["profile"] = {
            "compute_fit": asdict(self.compute_fit),
            "compute_samples": self.compute_samples,
            "alltoall": {str(d): dict(a) for d, a in self.alltoall.items()},
            "memory": {k: (v if k != "samples" else {str(a): b for a, b in v.items()}) for k, v in self.memory.items()},
            "environment": self.environment,
        }
        return out

    def write(self, path: str) -> None:
        """Write ``to_json`` to ``path`` after checking that the planner accepts it."""
        out = self.to_json()
        CostModel.from_dict(out)  # what the planner will read back
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
