"""Activation recomputation chosen per micro-batch and per SP group, with Megatron's flags and meanings.

Why not megatron's own: its TransformerBlock and SelfAttention read ``config.recompute_*`` once
(the core-attention switch at construction), for the whole run, and its checkpoint function saves
CUDA RNG state. FlexSP lets the plan choose a mode per SP group of every micro-batch (a short
sequence on one rank needs no recomputation, a long one may fit on fewer ranks with it), so the
mode travels with the data: the executor attaches a ``RecomputeSpec`` to the micro-batch's
``PackedSeqParams`` and the wrappers installed here read it at forward time.

* full: the decoder's layers run under a checkpoint that keeps only each chunk's input and
  re-runs the chunk in backward. ``uniform``: chunks of ``num_layers`` layers; ``block``: the first
  ``num_layers`` layers one by one, the rest normally (Megatron's meanings).
* selective: ``core_attn`` (FlexSP's all-to-all attention, which therefore exchanges again in
  backward and is counted by the runtime's all-to-all statistics) and ``mlp`` (the dense MLP).

The checkpoint is torch's non-reentrant one with the default generators preserved, plus a replay
of megatron's RNG-tracker states (FlexSP's SP-dropout state lives there), so dropout draws the
same masks in the recomputed forward on CPU and GPU. Under FSDP2 the recompute of a layer runs
inside that layer's backward, after its parameters were gathered; a chunk of several layers
gathers its earlier layers once more, so every rank of a run must then use the same mode
(``RecomputeConfig.validate`` refuses ``auto`` with chunks of more than one layer under FSDP2).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

__all__ = [
    "MODES",
    "GRANULARITIES",
    "METHODS",
    "SUPPORTED_MODULES",
    "MEGATRON_MODULES",
    "RecomputeError",
    "RecomputeConfig",
    "RecomputeSpec",
    "NO_RECOMPUTE",
    "attach_spec",
    "spec_of",
    "recompute_checkpoint",
    "install_recompute",
    "full_chunks",
    "SavedBytesMeter",
    "activation_bytes_per_token",
]

MODES = ("none", "selective", "full")  # what a plan group may carry
GRANULARITIES = ("none", "selective", "full", "auto")  # what --recompute-granularity accepts
METHODS = ("uniform", "block")
SUPPORTED_MODULES = ("core_attn", "mlp")
# megatron.core 0.16.1's --recompute-modules choices (TransformerConfig); the others need MoE,
# multi-latent attention or TE's layernorm checkpoint, which FlexSP's dense GPT does not have.
MEGATRON_MODULES = ("core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts")

_SPEC_ATTR = "flexsp_recompute"
_ACTIVE: contextvars.ContextVar[RecomputeSpec | None] = contextvars.ContextVar("flexsp_recompute", default=None)
_METER: contextvars.ContextVar[SavedBytesMeter | None] = contextvars.ContextVar("flexsp_saved_meter", default=None)


class RecomputeError(ValueError):
    """A recompute setting that cannot work (named by its Megatron flag)."""


@dataclass(frozen=True)
class RecomputeSpec:
    """The recomputation of one micro-batch on this rank: what the layers read at forward time."""

    mode: str = "none"
    method: str = "uniform"
    num_layers: int = 1
    modules: frozenset[str] = field(default_factory=lambda: frozenset({"core_attn"}))

    def selective(self, module: str) -> bool:
        return self.mode == "selective" and module in self.modules


NO_RECOMPUTE = RecomputeSpec()


@dataclass(frozen=True)
class RecomputeConfig:
    """The run's recompute flags (Megatron's): a fixed mode, or ``auto`` (each plan group's own mode).

    ``method``/``num_layers`` default to uniform/1 for full (every layer's input kept, each layer
    re-run), ``modules`` to megatron's default ``core_attn``.
    """

    granularity: str = "none"
    method: str | None = None
    num_layers: int | None = None
    modules: tuple[str, ...] | None = None

    def validate(self, model_layers: int, sharding: str = "fsdp2") -> None:
        """Raise RecomputeError naming the flag (before any work)."""
        g = self.granularity
        if g not in GRANULARITIES:
            raise RecomputeError(f"--recompute-granularity must be one of {', '.join(GRANULARITIES)}, got {g!r}")
        if self.method is not None and self.method not in METHODS:
            raise RecomputeError(f"--recompute-method must be uniform or block, got {self.method!r}")
        if self.method is not None and g not in ("full", "auto"):
            raise RecomputeError(f"--recompute-method {self.method} needs --recompute-granularity full (or auto)")
        n = self.num_layers
        if n is not None:
            if g not in ("full", "auto"):
                raise RecomputeError(f"--recompute-num-layers {n} needs --recompute-granularity full (or auto)")
            if n < 1 or n > model_layers:
                raise RecomputeError(f"--recompute-num-layers {n} must be between 1 and --num-layers {model_layers}")
        if self.modules is not None:
            if g not in ("selective", "auto"):
                raise RecomputeError("--recompute-modules needs --recompute-granularity selective (or auto)")
            bad = [m for m in self.modules if m not in SUPPORTED_MODULES]
            if bad:
                kind = "is not a megatron recompute module" if bad[0] not in MEGATRON_MODULES else "needs MoE/MLA/TE"
                raise RecomputeError(
                    f"--recompute-modules {bad[0]}: {kind}; FlexSP supports {', '.join(SUPPORTED_MODULES)}"
                )
            if not self.modules:
                raise RecomputeError("--recompute-modules needs at least one module")
        if g == "auto" and sharding == "fsdp2" and (self.method or "uniform") == "uniform" and (n or 1) > 1:
            raise RecomputeError(
                f"--recompute-granularity auto with --recompute-method uniform --recompute-num-layers {n}: a chunk "
                "of several layers re-gathers its FSDP2 shards in backward, which ranks of other modes would not "
                "do (use --recompute-num-layers 1, --recompute-method block, or a fixed granularity)"
            )

    def spec_for(self, group_mode: str = "none") -> RecomputeSpec:
        """This micro-batch's spec: the fixed mode, or under ``auto`` the plan group's ``group_mode``."""
        mode = group_mode if self.granularity == "auto" else self.granularity
        if mode not in MODES:
            raise RecomputeError(f"recompute mode {mode!r} is not one of {MODES}")
        if mode == "none":
            return NO_RECOMPUTE
        return RecomputeSpec(
            mode=mode,
            method=self.method or "uniform",
            num_layers=self.num_layers or 1,
            modules=frozenset(self.modules or ("core_attn",)),
        )


def attach_spec(packed_seq_params: Any, spec: RecomputeSpec) -> Any:
    """Let the micro-batch's data carry its recompute spec (read by the installed wrappers)."""
    setattr(packed_seq_params, _SPEC_ATTR, spec)
    return packed_seq_params


def spec_of(packed_seq_params: Any) -> RecomputeSpec:
    return getattr(packed_seq_params, _SPEC_ATTR, None) or NO_RECOMPUTE


def full_chunks(spec: RecomputeSpec, layers: int) -> list[tuple[int, int, bool]]:
    """(start, end, checkpointed) runs of layers for full recomputation (Megatron's uniform / block)."""
    if spec.method == "uniform":
        n = max(1, spec.num_layers)
        return [(s, min(s + n, layers), True) for s in range(0, layers, n)]
    if spec.method == "block":
        return [(i, i + 1, i < spec.num_layers) for i in range(layers)]
    raise RecomputeError(f"recompute method {spec.method!r} is not uniform or block")


# ------------------------------------------------------------------ checkpoint with RNG replay
def _tracker() -> Any | None:
    try:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        return get_cuda_rng_tracker()
    except Exception:  # noqa: BLE001 - no megatron tracker: only the default generators matter
        return None


def _tracker_states() -> dict[str, torch.Tensor] | None:
    tr = _tracker()
    if tr is None:
        return None
    return {k: v.clone() for k, v in tr.get_states().items()}


class _TrackerReplay:
    """The tracker's states as the checkpointed forward found them, put back for its recompute.

    Why: torch's checkpoint restores only the default CPU/CUDA generators; megatron's named
    states (FlexSP's per-rank SP-dropout state) advance in forward and would draw new masks.
    """

    def __init__(self) -> None:
        self.saved: dict[str, torch.Tensor] | None = None

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        self.saved = _tracker_states()
        yield

    @contextlib.contextmanager
    def recompute(self) -> Iterator[None]:
        tr = _tracker()
        if tr is None or self.saved is None:
            yield
            return
        current = tr.get_states()
        tr.set_states({k: v.clone() for k, v in self.saved.items()})
        try:
            yield
        finally:
            tr.set_states(current)


def recompute_checkpoint(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` keeping only its inputs; re-run in backward with the same random draws.

    Non-reentrant (composes with FSDP2's hooks and with kwargs); the tensors it keeps are the
    inputs, which an active ``SavedBytesMeter`` counts (torch keeps them by reference, outside
    the saved-tensor hooks).
    """
    meter = _METER.get()
    if meter is not None:
        meter.add_all([*args, *kwargs.values()])
    replay = _TrackerReplay()
    return torch_checkpoint(
        fn,
        *args,
        use_reentrant=False,
        preserve_rng_state=True,
        context_fn=lambda: (replay.forward(), replay.recompute()),
        **kwargs,
    )


class SavedBytesMeter:
    """Bytes of the distinct storages autograd keeps for backward while the context is open.

    ``torch.autograd.graph.saved_tensors_hooks`` sees what ops save; the inputs a checkpoint keeps
    are reported by ``recompute_checkpoint``. Deduplicated by storage (views and repeated saves
    of one tensor count once). Parameters are model states, not activations, and are left out:
    FSDP2 frees a layer's gathered weights after its forward, and an activation allocated at the
    same address later would be taken for the same storage.
    """

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}
        self._token: contextvars.Token | None = None
        self._hooks: Any = None

    def add(self, t: Any) -> None:
        if not torch.is_tensor(t) or isinstance(t, nn.Parameter):
            return
        if hasattr(t, "to_local"):
            t = t.to_local()
        try:
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a storage (some subclasses)
            key, nbytes = id(t), t.numel() * t.element_size()
        if key == 0 and nbytes == 0:
            return
        self.storages[key] = max(self.storages.get(key, 0), nbytes)

    def add_all(self, items: list[Any]) -> None:
        for t in items:
            self.add(t)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    def __enter__(self) -> SavedBytesMeter:
        self._token = _METER.set(self)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        _METER.reset(self._token)


# ------------------------------------------------------------------ wrappers on megatron's modules
def _block_checkpointed_forward(
    block: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: Any,
    context: Any,
    context_mask: Any,
    rotary_pos_emb: Any,
    attention_bias: Any,
    packed_seq_params: Any,
    use_inner_quantization_context: bool = False,
    padding_mask: Any = None,
) -> torch.Tensor:
    """Replaces TransformerBlock._checkpointed_forward: the spec's chunks under ``recompute_checkpoint``."""
    spec = spec_of(packed_seq_params)

    def run(start: int, end: int) -> Callable[..., torch.Tensor]:
        def chunk(h: torch.Tensor, ctx: Any, rope: Any) -> torch.Tensor:
            for i in range(start, end):
                h, ctx = block.layers[i](
                    hidden_states=h,
                    attention_mask=attention_mask,
                    context=ctx,
                    context_mask=context_mask,
                    rotary_pos_emb=rope,
                    attention_bias=attention_bias,
                    inference_context=None,
                    packed_seq_params=packed_seq_params,
                    padding_mask=padding_mask,
                )
            return h

        return chunk

    for start, end, ckpt in full_chunks(spec, len(block.layers)):
        if ckpt:
            hidden_states = recompute_checkpoint(run(start, end), hidden_states, context, rotary_pos_emb)
        else:
            hidden_states = run(start, end)(hidden_states, context, rotary_pos_emb)
    return hidden_states


def _wrap_decoder(block: nn.Module) -> None:
    """Full recomputation per call: megatron's block takes its checkpointed path when the call's spec says so.

    The block gets a private copy of the config whose ``recompute_granularity`` is set for the
    duration of one call only (megatron reads it at forward time); the spec of the running
    forward is also published to the MLP wrappers, which get no ``packed_seq_params``.
    """
    block.config = copy.copy(block.config)
    block.config.recompute_granularity = None
    orig = block.forward
    block._checkpointed_forward = types.MethodType(_block_checkpointed_forward, block)

    def forward(*args: Any, **kwargs: Any) -> Any:
        spec = spec_of(kwargs.get("packed_seq_params"))
        full = spec.mode == "full" and block.training and torch.is_grad_enabled()
        token = _ACTIVE.set(spec)
        block.config.recompute_granularity = "full" if full else None
        try:
            return orig(*args, **kwargs)
        finally:
            block.config.recompute_granularity = None
            _ACTIVE.reset(token)

    block.forward = forward


def _wants(module: str, spec: RecomputeSpec | None, m: nn.Module) -> bool:
    return spec is not None and spec.selective(module) and m.training and torch.is_grad_enabled()


def _wrap_core_attention(core: nn.Module) -> None:
    """Selective ``core_attn``: the attention (all-to-all, kernel, all-to-all back) re-runs in backward."""
    orig = core.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if _wants("core_attn", spec_of(kwargs.get("packed_seq_params")), core):
            return recompute_checkpoint(orig, *args, **kwargs)
        return orig(*args, **kwargs)

    core.forward = forward


def _wrap_mlp(mlp: nn.Module) -> None:
    """Selective ``mlp``: only the MLP's input is kept; fc1, activation and fc2 re-run in backward."""
    orig = mlp.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if _wants("mlp", _ACTIVE.get(), mlp):
            return recompute_checkpoint(orig, *args, **kwargs)
        return orig(*args, **kwargs)

    mlp.forward = forward


def _settle_first_call_probes() -> None:
    """Run the attention's one-time feature probe now, outside any checkpoint.

    Why: ``sdpa`` checks once whether SDPA takes ``enable_gqa`` by calling it (with autograd on);
    inside a checkpointed forward that first call saves tensors which the recompute does not,
    and torch rejects the recompute (a different number of saved tensors).
    """
    from .sdpa import sdpa_varlen

    with torch.no_grad():
        q, kv = torch.zeros(1, 2, 1), torch.zeros(1, 1, 1)
        sdpa_varlen(q, kv, kv, [0, 1], 1.0)


def install_recompute(model: nn.Module) -> nn.Module:
    """Install the per-call recompute wrappers on a megatron GPTModel (idempotent; before or after sharding).

    Without a spec on the data (or with mode none) the model computes exactly as before.
    """
    decoder = getattr(model, "decoder", None)
    if decoder is None or not hasattr(decoder, "layers"):
        raise TypeError(f"install_recompute: {type(model).__name__} has no decoder.layers (a megatron GPTModel)")
    if getattr(model, "_flexsp_recompute_installed", False):
        return model
    cfg_gran = getattr(decoder.config, "recompute_granularity", None)
    if cfg_gran is not None:
        raise RecomputeError(
            f"the model was built with megatron's own recompute_granularity={cfg_gran!r}; FlexSP's per-micro-batch "
            "recomputation replaces it (leave the TransformerConfig's recompute fields unset)"
        )
    _settle_first_call_probes()
    _wrap_decoder(decoder)
    for layer in decoder.layers:
        core = getattr(getattr(layer, "self_attention", None), "core_attention", None)
        if core is not None:
            _wrap_core_attention(core)
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and not getattr(layer, "is_moe_layer", False):
            _wrap_mlp(mlp)
    model._flexsp_recompute_installed = True
    return model


# ------------------------------------------------------------------ closed-form memory model
# Bytes per token that do not scale with the width: input ids and labels (int64), the float loss
# mask and the bool mask of the loss (what the executor's loss path saves).
_INT_BYTES_PER_TOKEN = 21


def _layer_elements(cfg: Any, spec: RecomputeSpec, packed: bool) -> float:
    """Elements per token one transformer layer saves for backward at degree 1 (no recomputation of it).

    RMSNorm saves its input, 1/rms, the normalised x and x*w (3h + 1), twice per layer; RoPE its
    cos/sin tables for q and k (4 x head dim); attention the fused qkv output, the rotated q and
    k, its output and the softmax log-sum-exp (per head); SwiGLU's MLP the fc1 output (2f) and
    the gate's three f-wide intermediates (GeLU: fc1 and activation outputs, 2f). With several
    documents packed, the per-document attention outputs are kept besides their concatenation.
    """
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    groups = cfg.num_query_groups or heads
    dh = cfg.kv_channels or h // heads
    q, kv = heads * dh, groups * dh
    f = cfg.ffn_hidden_size or 4 * h
    mlp = 5 * f if cfg.swiglu else 2 * f
    rope = 4 * dh if cfg.position_embedding_type == "rope" else 0
    # what a recomputed core attention no longer keeps at degree 1: the log-sum-exp per head, and
    # with packed documents their separate outputs
    attn_internal = heads + (q if packed else 0)
    n = 6 * h + 2 + rope + 3 * q + 3 * kv + attn_internal + mlp
    if spec.selective("core_attn"):
        n -= attn_internal
    if spec.selective("mlp"):
        n -= mlp
    return float(n)


def activation_bytes_per_token(
    cfg: Any, spec: RecomputeSpec = NO_RECOMPUTE, *, bytes_per_element: int = 4, packed: bool = True
) -> float:
    """Bytes per token saved for backward on one rank at degree 1, from the model shape (``GPTConfig``).

    Why closed form: the planner's prior needs the per-mode activation cost of a model it has not
    profiled; ``SavedBytesMeter`` measures the same quantity (tests check they agree). Exact for
    the default Llama-style model (RoPE, RMSNorm, SwiGLU, no dropout) in fp32; ``bytes_per_element``
    2 approximates bf16. Full recomputation keeps one hidden state per checkpointed chunk (plus the
    RoPE frequencies the chunks share); the final norm, the logits and the loss are never recomputed.
    ``packed``: the micro-batch packs several documents (the default, and the larger figure); a
    single document saves one attention output less per layer.
    At degree d > 1 (the planner divides by d) a rank keeps about the same per local token: the
    all-to-all buffers take the place of the rotated q and k (measured within 7% up to d = 4). A
    recomputed core attention then keeps its pre-exchange inputs, as much as it drops: with
    flash-style attention, ``core_attn`` buys almost no memory (it pays off with unfused attention).
    """
    h, layers = cfg.hidden_size, cfg.num_layers
    dh = cfg.kv_channels or h // cfg.num_attention_heads
    rope_arg = dh if cfg.position_embedding_type == "rope" else 0
    head = 3 * h + 1 + cfg.vocab_size  # final norm and logits
    if spec.mode == "full":
        runs = full_chunks(spec, layers)
        kept = sum(1 for _, _, ck in runs if ck) * h + rope_arg
        plain = sum(e - s for s, e, ck in runs if not ck) * _layer_elements(cfg, NO_RECOMPUTE, packed)
        elements = kept + plain + head
    else:
        elements = layers * _layer_elements(cfg, spec, packed) + head
    return _INT_BYTES_PER_TOKEN + bytes_per_element * elements
