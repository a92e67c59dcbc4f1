"""An analytic cost model from the model's shape and the device, for runs without a matching profile.

Why: a run whose model shape differs from every preset (or with no ``--flexsp-cost-model``)
must still train; it starts from this prior and the online calibration (``calibration.py``)
corrects it within a few iterations. The prior only has to be the right order of magnitude and
have the right *shape* (quadratic attention vs linear layers, cheap intra-node vs slow
inter-node all-to-all, activation memory per token), and it must be honest about where it
comes from: every formula is written out below and tested against a hand computation.

Formulas (one token, whole model, ``L`` layers, hidden ``h``, ``a`` heads, ``g`` query groups,
FFN ``f``, vocabulary ``V``, ``e`` bytes per element):

* parameters: per layer ``h (h + 2 h g / a)`` (QKV) ``+ h^2`` (output) ``+ m h f`` (MLP, m = 3 with
  SwiGLU, else 2) ``+ 2 h`` (norms); plus ``V h`` embedding, ``V h`` output layer (none when tied), ``h``
  final norm;
* linear FLOPs: forward ``2 * (L * (h (h + 2hg/a) + h^2 + m h f) + V h)``, training = 3x forward
  (backward is twice the forward), so ``alpha2 = 3 * 2 * linear_params / flops_per_ms``;
* attention FLOPs of a sequence of s tokens: forward ``4 s^2 h`` per layer (QK^T and AV), halved
  when causal, training 3x: ``alpha1 = 3 * 4 * h * L * (0.5 if causal) / flops_per_ms``;
* ``flops_per_ms`` = device FLOP/s * ``efficiency`` / 1000 (the peak is never reached);
* beta1: ZeRO-3 moves the parameters three times per micro-batch (gather for forward and for
  backward, reduce-scatter of gradients): ``3 * P * e * (ws - 1) / ws`` bytes over the slowest link
  the data-parallel group crosses; 0 with replicated states; plus ``overhead_ms``;
* all-to-all: ``bytes_per_token`` is ``costmodel.alltoall_bytes_per_token`` (DESIGN.md's
  definition). A rank of a degree-d group holds T/d tokens and sends the share going to other
  ranks: (d-1)/d inside a node, or (d - gpus_per_node)/d over its inter-node link for larger
  groups, so the formula's effective bandwidth is ``link * d / (d-1)`` resp.
  ``link * d / (d - gpus_per_node)``, converted from GB/s (1e9 B/s) to the model's 2^20 B/ms;
* memory: model states ``16 P / ws`` bytes (ZeRO-3: bf16 weights and grads, fp32 master and two
  Adam moments) or ``16 P`` replicated; activations saved for backward per token
  ``e * L * (7 h + 2 h g / a + (3 if swiglu else 2) f) + 4 V`` bytes (norm, QKV inputs, q, k, v,
  attention output, projection input, MLP inputs and intermediate activations with flash
  attention, i.e. no s^2 term; fp32 logits) times ``activation_factor``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .costmodel import CostModel, CostModelError, alltoall_bytes_per_token

__all__ = [
    "ModelShape",
    "analytic_cost_model",
    "num_parameters",
    "prior_bandwidths",
    "recompute_section",
    "with_recompute_modes",
]

_GBS_TO_MODEL = 1e9 / 1000.0 / 2**20  # 1 GB/s in the cost model's units (2^20 bytes per ms)


@dataclass(frozen=True)
class ModelShape:
    """The transformer's shape, as Megatron's arguments give it."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None  # default 4 * hidden
    swiglu: bool = False
    tied_embeddings: bool = False  # the output layer reuses the embedding (Megatron without --untie-...)

    @property
    def groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def mlp_mats(self) -> int:
        return 3 if self.swiglu else 2

    def linear_params_per_layer(self) -> float:
        h = self.hidden_size
        return h * (h + 2 * h * self.groups / self.num_attention_heads) + h * h + self.mlp_mats * h * self.ffn


def num_parameters(shape: ModelShape) -> float:
    """Parameters of a GPT of this shape (embedding and output layer: ``V h`` each, once when tied)."""
    h, L, V = shape.hidden_size, shape.num_layers, shape.vocab_size
    return L * (shape.linear_params_per_layer() + 2 * h) + (1 if shape.tied_embeddings else 2) * V * h + h


def prior_bandwidths(
    world_size: int, gpus_per_node: int, intra_node_gbs: float, inter_node_gbs: float
) -> dict[int, float]:
    """Effective all-to-all bandwidth (model units) per degree >= 2 whose groups tile nodes or lie in one."""
    g = gpus_per_node
    out: dict[int, float] = {}
    for d in range(2, max(world_size, 2) + 1):
        if d <= g and g % d == 0:
            out[d] = intra_node_gbs * _GBS_TO_MODEL * d / (d - 1)
        elif d > g and d % g == 0:
            out[d] = inter_node_gbs * _GBS_TO_MODEL * d / (d - g)
    if not out:  # one GPU per node and a world of one: the JSON form still needs a bandwidth
        out[2] = inter_node_gbs * _GBS_TO_MODEL * 2
    return out


def _compute_terms(shape: ModelShape, flops_per_ms: float, causal: bool) -> tuple[float, float]:
    """(alpha1, alpha2): attention's quadratic and the matmuls' linear ms per token, forward + backward."""
    h, L, V = shape.hidden_size, shape.num_layers, shape.vocab_size
    lin_params = L * shape.linear_params_per_layer() + V * h  # output layer is a matmul too
    alpha2 = 3.0 * 2.0 * lin_params / flops_per_ms
    alpha1 = 3.0 * 4.0 * h * L * (0.5 if causal else 1.0) / flops_per_ms
    return alpha1, alpha2


def _states(
    P: float, e: int, world_size: int, sharding: str, link_gbs: float, overhead_ms: float
) -> tuple[float, float]:
    """(beta1 ms, model-state MB per GPU): ZeRO-3 gathers the parameters over ``link_gbs`` once per
    micro-batch (forward, backward, and the gradients' reduce-scatter) and splits the states; DDP does neither."""
    if sharding == "zero3" and world_size > 1:
        beta1 = 3.0 * P * e * (world_size - 1) / world_size / (link_gbs * 1e9) * 1000.0 + overhead_ms
        return beta1, 16.0 * P / world_size / 2**20
    return overhead_ms, 16.0 * P / 2**20


def _alltoall_section(
    shape: ModelShape, e: int, world_size: int, gpus_per_node: int, intra_node_gbs: float, inter_node_gbs: float
) -> dict:
    """The cost model's ``alltoall`` section: bytes per token of the model, guessed bandwidth per degree."""
    bw = prior_bandwidths(world_size, gpus_per_node, intra_node_gbs, inter_node_gbs)
    return {
        "bytes_per_token": alltoall_bytes_per_token(
            shape.num_layers, shape.hidden_size, shape.num_attention_heads, shape.groups, e
        ),
        "bandwidth_gbs": {str(k): v for k, v in bw.items()},
    }


def _activation_mb(shape: ModelShape, e: int) -> float:
    """Activation MB per token kept for the backward (before ``activation_factor``)."""
    h, L, V = shape.hidden_size, shape.num_layers, shape.vocab_size
    act_bytes = e * L * (7 * h + 2 * h * shape.groups / shape.num_attention_heads + shape.mlp_mats * shape.ffn) + 4 * V
    return act_bytes / 2**20


def recompute_section(
    shape: ModelShape,
    alpha1: float,
    alpha2: float,
    activation_factor: float = 1.0,
    *,
    e: int = 2,
    modules: tuple[str, ...] = ("core_attn",),
    ref_len: int = 32768,
) -> dict:
    """The cost model's optional ``recompute`` key (planner/recompute.py) derived from the shape.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") count
    per layer sbh(34 + 5as/h) bytes, selective recomputation sbh*34 and full recomputation the
    layer input 2sbh. With flash attention the 5as/h term (scores, softmax, its dropout) is never
    stored, so "none" here is ``_activation_mb``'s count per layer, A = e (7h + 2hg/a + m f) (GQA:
    k, v are 2hg/a; SwiGLU: m = 3), plus 4V bytes of fp32 logits; the modes drop from it:

    * selective, per recomputed module (Megatron's --recompute-modules): ``core_attn`` keeps its
      inputs q, k, v (as before) and drops the attention output the kernel keeps, e h; ``mlp``
      keeps only the MLP input (already counted as fc1's input) and drops fc1's output and the
      activation, e m f. Activations: L (A - those) + 4V;
    * full: each layer's input, e h, plus one layer's A re-created while that layer runs its
      backward, plus 4V: L e h + A + 4V.

    Compute (f+b = 3 forwards): a recomputed part runs its forward once more. At ``ref_len`` tokens
    a token costs alpha1 s (attention) + alpha2 (matmuls; the layers' share of the matmul
    parameters is ``lin_layers``, the MLP's ``lin_mlp``), so
    full: 1 + (alpha1 s + alpha2 lin_layers) / (3 (alpha1 s + alpha2)); selective: 1 + (alpha1 s
    [core_attn] + alpha2 lin_mlp [mlp]) / (3 (alpha1 s + alpha2)). All-to-all: the attention's
    forward exchange (half of f+b) runs again when the attention is recomputed: 1.5 for full and
    for ``core_attn``, else 1. The online calibration corrects the compute factors.
    """
    h, L, V, m, f = shape.hidden_size, shape.num_layers, shape.vocab_size, shape.mlp_mats, shape.ffn
    A = e * (7 * h + 2 * h * shape.groups / shape.num_attention_heads + m * f)
    drop = (e * h if "core_attn" in modules else 0) + (e * m * f if "mlp" in modules else 0)
    lin_all = L * shape.linear_params_per_layer() + V * h
    lin_layers, lin_mlp = L * shape.linear_params_per_layer() / lin_all, L * m * h * f / lin_all
    per_tok = 3.0 * (alpha1 * ref_len + alpha2)
    sel_extra = (alpha1 * ref_len if "core_attn" in modules else 0.0) + (alpha2 * lin_mlp if "mlp" in modules else 0.0)

    def mb(nbytes: float) -> float:
        return nbytes / 2**20 * activation_factor

    return {
        "selective": {
            "activation_mb_per_token": mb(L * (A - drop) + 4 * V),
            "compute_factor": 1.0 + sel_extra / per_tok,
            "alltoall_factor": 1.5 if "core_attn" in modules else 1.0,
        },
        "full": {
            "activation_mb_per_token": mb(L * e * h + A + 4 * V),
            "compute_factor": 1.0 + (alpha1 * ref_len + alpha2 * lin_layers) / per_tok,
            "alltoall_factor": 1.5,
        },
    }


def with_recompute_modes(
    cost: CostModel, shape: ModelShape, *, e: int = 2, modules: tuple[str, ...] = ("core_attn",)
) -> CostModel:
    """``cost`` plus the recompute modes it lacks, from ``recompute_section`` of its model's shape: the
    shape gives the ratio of each mode's activations to mode none's, ``cost``'s measured
    activation_mb_per_token the level, its alpha1/alpha2 the compute split. Modes it has (measured by
    flexsp-profile) are kept as they are."""
    level = cost.memory.activation_mb_per_token / _activation_mb(shape, e)
    c = cost.compute
    derived = recompute_section(shape, c.alpha1_ms_per_token2, c.alpha2_ms_per_token, level, e=e, modules=modules)
    d = cost.to_dict()
    d["recompute"] = {**derived, **d.get("recompute", {})}
    return CostModel.from_dict(d)


def analytic_cost_model(
    shape: ModelShape,
    *,
    device_flops: float,
    intra_node_gbs: float,
    inter_node_gbs: float,
    limit_gb: float,
    gpus_per_node: int,
    world_size: int,
    bytes_per_element: int = 2,
    efficiency: float = 1.0,
    causal: bool = True,
    sharding: str = "zero3",
    overhead_ms: float = 0.0,
    activation_factor: float = 1.0,
    name: str | None = None,
    recompute_modules: tuple[str, ...] = ("core_attn",),  # what selective recomputes (recompute_section)
) -> CostModel:
    """The prior cost model (formulas in the module docstring).

    ``device_flops``: FLOP/s of one device (measured, or the peak; ``efficiency`` scales it).
    ``intra_node_gbs`` / ``inter_node_gbs``: per-GPU link bandwidth guesses in GB/s (1e9 B/s).
    ``sharding``: "zero3" (states and per-micro-batch gathers split over the world) or "ddp" (neither)."""
    if device_flops <= 0 or efficiency <= 0 or intra_node_gbs <= 0 or inter_node_gbs <= 0:
        raise CostModelError("analytic prior: device_flops, efficiency and link bandwidths must be > 0")
    if sharding not in ("zero3", "ddp"):
        raise CostModelError(f"analytic prior: sharding must be 'zero3' or 'ddp', got {sharding!r}")
    h, L, e = shape.hidden_size, shape.num_layers, bytes_per_element
    alpha1, alpha2 = _compute_terms(shape, device_flops * efficiency / 1000.0, causal)
    P = num_parameters(shape)
    link = inter_node_gbs if world_size > gpus_per_node else intra_node_gbs
    beta1, states_mb = _states(P, e, world_size, sharding, link, overhead_ms)
    act_mb = _activation_mb(shape, e) * activation_factor
    return CostModel.from_dict(
        {
            "name": name
            or (
                f"analytic prior: {L} layers, hidden {h}, {shape.num_attention_heads} heads, "
                f"{device_flops * efficiency / 1e12:.3g} TFLOP/s, {intra_node_gbs:g}/{inter_node_gbs:g} GB/s"
            ),
            "num_layers": L,
            "hidden_size": h,
            "num_attention_heads": shape.num_attention_heads,
            "num_query_groups": shape.groups,
            "gpus_per_node": gpus_per_node,
            "compute": {"alpha1_ms_per_token2": alpha1, "alpha2_ms_per_token": alpha2, "beta1_ms": beta1},
            "alltoall": _alltoall_section(shape, e, world_size, gpus_per_node, intra_node_gbs, inter_node_gbs),
            "memory": {"limit_gb": limit_gb, "model_states_mb": states_mb, "activation_mb_per_token": act_mb},
            "recompute": recompute_section(shape, alpha1, alpha2, activation_factor, e=e, modules=recompute_modules),
            "prior": dict(
                device_flops=device_flops,
                efficiency=efficiency,
                intra_node_gbs=intra_node_gbs,
                inter_node_gbs=inter_node_gbs,
                num_parameters=P,
                sharding=sharding,
            ),
        }
    )
