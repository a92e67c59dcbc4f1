"""FlexSP core attention: Ulysses all-to-all around causal attention over packed documents.

Plugs into megatron.core as the ``core_attention`` submodule of a GPT layer spec (same
constructor as ``DotProductAttention``). Per call it takes the micro-batch's SP group from the
data, ``packed_seq_params.cp_group`` / ``local_cp_size`` (megatron-core 0.16.1+ carries them;
``runtime.sp_group.packed_seq_params`` sets them once per micro-batch; no group means degree 1),
so one model serves groups of every degree:

    q, k, v  [s_local, 1, heads, d]  this rank's contiguous slice of the packed group
      -> all-to-all (one collective for q, k, v)      [T, heads / P, d]
      -> causal attention per document (cu_seqlens)   [T, heads / P, d]
      -> all-to-all back                              [s_local, 1, heads * d]

Degree 1 does no communication. Backends for the local attention:

* ``sdpa``: torch scaled_dot_product_attention, one causal call per document (CPU and GPU;
  ``runtime.sdpa``, with the GQA rule that keeps SDPA off its math kernel).
* ``flash``: flash-attn 2 ``flash_attn_varlen_func`` on the packed tokens (GPU, fp16/bf16).
* ``te``: Transformer Engine ``DotProductAttention`` in ``thd`` format with ``padding_causal``
  masks (GPU). The exchange is FlexSP's own, done with the group of each call; TE runs the
  already-exchanged full documents without its own context parallelism. Reason: TE's
  ``cp_comm_type="a2a"`` reorders tokens for its DualChunkSwap load-balancing layout (each
  document split into 2 * cp chunks), which is not FlexSP's contiguous-slice layout, and its
  a2a path does not accept the ``thd`` format of packed documents.
* ``auto``: the one rule of ``resolve_backend`` (te > flash > sdpa on CUDA with bf16, sdpa
  otherwise), applied per call from the tensors' device and dtype.

flash and te need fp16/bf16 tensors; fp32 stops with a clear ValueError, not a kernel error.

Masking comes only from the documents' boundaries (``packed_seq_params`` cu_seqlens, or one
document when absent) and causality: a dense ``attention_mask`` argument is ignored.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import sys
from typing import Any

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from .alltoall import AllToAllStats, group_size, head_to_seq, qkv_seq_to_head
from .sdpa import LOW_PRECISION, sdpa_native_gqa, sdpa_varlen
from .sp_dropout import sp_dropout_rng, sp_dropout_tracker

__all__ = [
    "BACKENDS",
    "FlexSPCoreAttention",
    "backend_importable",
    "resolve_backend",
    "sdpa_native_gqa",
    "varlen_causal_attention",
]

BACKENDS = ("sdpa", "flash", "te", "auto")
_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal)
log = logging.getLogger(__name__)

# backend -> (module to import, top-level package, pip name). The import is the real one: an
# ABI-mismatched flash-attn (undefined symbol in its CUDA extension) or a core-only Transformer
# Engine (no ``transformer_engine.pytorch``) is found by find_spec but cannot run.
_KERNEL_MODULES = {
    "flash": ("flash_attn", "flash_attn", "flash-attn"),
    "te": ("transformer_engine.pytorch", "transformer_engine", "transformer-engine[pytorch]"),
}
# backend -> (kernel, None) when it imports, (None, "Type: message") when it does not; per process.
_IMPORTS: dict[str, tuple[Any, str | None]] = {}
_WARNED: set[str] = set()


def _try_import(backend: str) -> tuple[Any, str | None]:
    """Import a GPU backend's kernel once per process; never raises (the error is returned as text)."""
    if backend not in _IMPORTS:
        module = _KERNEL_MODULES[backend][0]
        try:
            mod = importlib.import_module(module)
            kernel = mod.flash_attn_varlen_func if backend == "flash" else mod
            if backend == "te":
                kernel.DotProductAttention  # noqa: B018 - a TE without the attention module cannot serve
            _IMPORTS[backend] = (kernel, None)
        except Exception as e:  # noqa: BLE001 - ImportError, OSError (missing .so), RuntimeError (CUDA/ABI)...
            _IMPORTS[backend] = (None, f"{type(e).__name__}: {e}")
    return _IMPORTS[backend]


def _installed(backend: str) -> bool:
    """Whether the backend's top-level package is on the path at all (import not attempted)."""
    top = _KERNEL_MODULES[backend][1]
    if top in sys.modules:
        return True
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def _forget_imports() -> None:
    """Drop the per-process import results and warnings (tests that change sys.path use it)."""
    _IMPORTS.clear()
    _WARNED.clear()


def backend_importable(name: str) -> bool:
    """Whether backend ``name`` can actually run here: its kernel module imports (cached per process).

    'sdpa' (torch) always can. For 'flash' / 'te' the real import is tried, so a package that is
    installed but broken (ABI mismatch, core-only TE, missing CUDA libraries) counts as not importable.
    """
    name = name.lower()
    if name == "sdpa":
        return True
    if name not in _KERNEL_MODULES:
        raise ValueError(f"unknown FlexSP attention backend '{name}' (importable applies to sdpa, flash, te)")
    return _try_import(name)[0] is not None


def _require(backend: str):
    """The kernel of a backend ('flash': flash_attn_varlen_func, 'te': transformer_engine.pytorch),
    or ImportError naming the package to install and why the import failed."""
    if backend not in _KERNEL_MODULES:
        return None
    kernel, error = _try_import(backend)
    if kernel is None:
        pip = _KERNEL_MODULES[backend][2]
        raise ImportError(
            f"FlexSP attention backend '{backend}' needs the '{pip.split('[')[0]}' package "
            f"(see docs/gpu.md: pip install --no-build-isolation {pip}); import failed: {error}"
        )
    return kernel


def _note_skipped(skipped: tuple[str, ...], chosen: str) -> None:
    """'auto' passed over ``skipped``: one warning line (per process) naming the installed but broken ones."""
    new = [b for b in skipped if b not in _WARNED]
    _WARNED.update(new)  # examined once: find_spec is not repeated per layer and call
    broken = [b for b in new if _installed(b)]
    if broken:
        log.warning(
            "FlexSP attention 'auto': installed but not importable, so using %s: %s",
            chosen,
            "; ".join(f"{_KERNEL_MODULES[b][1]} ({_try_import(b)[1]})" for b in broken),
        )


def resolve_backend(backend: str | None, device: torch.device | None = None, *, bf16: bool = False) -> str:
    """The one backend rule: validate a name and resolve 'auto' (None means 'sdpa').

    'auto': on CUDA with bf16, Transformer Engine if it imports, else flash-attn if it imports,
    else SDPA; on the CPU or without bf16, SDPA (flash-attn rejects fp32, and TE has no fp32
    packed (THD) path: its unfused fallback pads to [documents, max length] and runs out of
    memory). An installed package that fails to import is skipped with one warning line per
    process. Explicit 'flash' / 'te' need ``bf16`` and a CUDA device (ValueError otherwise) and
    a working import (ImportError naming the package otherwise). ``device`` None means this process's default:
    CUDA when available.
    """
    name = (backend or "sdpa").lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown FlexSP attention backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if name == "sdpa":
        return name
    if name in _KERNEL_MODULES and not bf16:
        why = (
            "flash-attn rejects fp32"
            if name == "flash"
            else "Transformer Engine has no fp32 path for packed (THD) sequences"
        )
        raise ValueError(
            f"attention backend '{name}' needs bf16 ({why}): add --bf16, or use "
            f"--attention-backend sdpa (or auto, which picks sdpa without bf16)"
        )
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = torch.device(device).type == "cuda"
    if name != "auto":
        if not on_cuda:
            raise ValueError(
                f"attention backend '{name}' runs on CUDA only, this run computes on {device}: "
                f"use --attention-backend sdpa (or auto)"
            )
        _require(name)
        return name
    if not on_cuda or not bf16:
        return "sdpa"
    chosen = "sdpa"
    for candidate in ("te", "flash"):
        if backend_importable(candidate):
            chosen = candidate
            break
    _note_skipped(("te", "flash")[: ("te", "flash", "sdpa").index(chosen)], chosen)
    return chosen


# --------------------------------------------------------------------------- cu_seqlens caches
# All layers of one forward share one PackedSeqParams; convert its cu_seqlens once, not per layer
# (on CUDA every .tolist() is a device sync).
# The caches hold a reference to the source tensor, so identity plus version is a safe key.
_BOUNDS_CACHE: list[Any] = [None, -1, None]
_DEVICE_CU_CACHE: dict[Any, tuple] = {}


def _bounds(cu: torch.Tensor) -> list[int]:
    if _BOUNDS_CACHE[0] is not cu or _BOUNDS_CACHE[1] != cu._version:
        _BOUNDS_CACHE[:] = [cu, cu._version, [int(x) for x in cu.tolist()]]
    return _BOUNDS_CACHE[2]


def _cu_on(cu: torch.Tensor, device: torch.device) -> torch.Tensor:
    if cu.device == device and cu.dtype == torch.int32:
        return cu
    hit = _DEVICE_CU_CACHE.get(device)
    if hit is None or hit[0] is not cu or hit[1] != cu._version:
        _DEVICE_CU_CACHE[device] = (cu, cu._version, cu.to(device=device, dtype=torch.int32))
    return _DEVICE_CU_CACHE[device][2]


def varlen_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    backend: str = "sdpa",
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    te_module: Any = None,
) -> torch.Tensor:
    """Causal attention per packed document: q [T, h, d], k/v [T, hk, d] (h % hk == 0) -> [T, h, d].

    ``cu_seqlens``: document boundaries [0, ..., T] (int, CPU or device). Used directly by the
    distributed FlexSPCoreAttention after the exchange, and as the single-process kernel.
    """
    total = q.shape[0]
    bounds = _bounds(cu_seqlens)
    if bounds[0] != 0 or bounds[-1] != total or any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(
            f"cu_seqlens must rise from 0 to the {total} packed tokens, got "
            f"{bounds if len(bounds) <= 10 else bounds[:5] + ['...'] + bounds[-3:]}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if backend == "sdpa":
        return sdpa_varlen(q, k, v, bounds, scale, dropout_p)
    if backend == "flash":
        fn = _require("flash")
        cu = _cu_on(cu_seqlens, q.device)
        return fn(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=dropout_p, softmax_scale=scale, causal=True)
    if backend == "te":
        if te_module is None:
            raise ValueError("backend 'te' needs the TE DotProductAttention module (FlexSPCoreAttention builds it)")
        cu = _cu_on(cu_seqlens, q.device)
        out = te_module(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            max_seqlen_q=max_seqlen,
            max_seqlen_kv=max_seqlen,
            attn_mask_type="padding_causal",
        )
        return out.view(total, q.shape[1], q.shape[2])
    raise ValueError(f"unknown backend '{backend}'")


class FlexSPCoreAttention(MegatronModule):
    """Drop-in ``core_attention`` for megatron.core GPT layer specs (see module docstring).

    Constructor: DotProductAttention's, plus ``backend`` (also read from
    ``config.flexsp_attention_backend`` when not given; ModuleSpec ``params`` can set it).
    Activation recomputation re-runs forward with the same packed_seq_params, hence the same group.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
        backend: str | None = None,
        a2a_stats: AllToAllStats | None = None,
        **kwargs: Any,
    ):
        super().__init__(config=config)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if attention_type != "self":
            raise NotImplementedError(f"FlexSPCoreAttention supports self-attention only, got '{attention_type}'")
        if attn_mask_type not in _CAUSAL_TYPES:
            raise NotImplementedError(f"FlexSPCoreAttention is causal-only; got attn_mask_type {attn_mask_type}")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise NotImplementedError(
                f"FlexSPCoreAttention supports softmax_type 'vanilla' only, got {config.softmax_type}"
            )
        if getattr(config, "window_size", None) is not None:
            raise NotImplementedError(
                "FlexSPCoreAttention does not support sliding-window attention (config.window_size)"
            )
        tp_group = getattr(pg_collection, "tp", None) if pg_collection is not None else None
        tp = tp_group.size() if tp_group is not None else 1
        heads, groups = config.num_attention_heads, (config.num_query_groups or config.num_attention_heads)
        if heads % tp or groups % tp:
            raise ValueError(f"tensor-parallel size {tp} must divide the heads ({heads}) and query groups ({groups})")
        self.num_heads = heads // tp
        self.num_kv_heads = groups // tp
        self.head_dim = config.kv_channels
        # Megatron's query-key layer scaling divides the scale by layer_number and multiplies the
        # scores back in the softmax: the net scale is the plain one.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = float(config.attention_dropout if attention_dropout is None else attention_dropout)
        requested = (backend or getattr(config, "flexsp_attention_backend", None) or "sdpa").lower()
        if requested not in BACKENDS:
            raise ValueError(f"unknown FlexSP attention backend '{requested}' (choose from {', '.join(BACKENDS)})")
        if requested in ("flash", "te"):
            _require(requested)  # fail at model build, naming the missing (or broken) package
        self.backend = requested  # 'auto' is resolved per call from the tensors' device and dtype
        self.a2a_stats = a2a_stats
        # Per (heads, kv heads) local shape. Kept out of the module tree (they hold no parameters,
        # and must not appear in state dicts or FSDP's wrapping), so ``train`` below forwards the
        # mode to them: TE reads ``self.training`` for dropout and for its backend choice.
        self.__dict__["_te_modules"] = {}

    def train(self, mode: bool = True) -> FlexSPCoreAttention:
        """nn.Module.train, also for the TE modules outside the module tree (eval: no dropout)."""
        super().train(mode)
        for m in self.__dict__["_te_modules"].values():
            if hasattr(m, "train"):
                m.train(mode)
        return self

    # ------------------------------------------------------------------ helpers
    def _te_module(self, heads: int, kv_heads: int):
        key = (heads, kv_heads)
        mods = self.__dict__["_te_modules"]
        if key not in mods:
            te = _require("te")
            kwargs = dict(
                num_attention_heads=heads,
                kv_channels=self.head_dim,
                num_gqa_groups=kv_heads,
                attention_dropout=self.dropout_p,
                qkv_format="thd",
                attn_mask_type="padding_causal",
                layer_number=self.layer_number,
                attention_type="self",
                softmax_scale=self.softmax_scale,
            )
            if self.dropout_p > 0:
                kwargs["get_rng_state_tracker"] = sp_dropout_tracker  # this rank's state, not the shared one
            mod = te.DotProductAttention(**kwargs)
            if hasattr(mod, "train"):
                mod.train(self.training)  # created lazily: start in the parent's current mode
            mods[key] = mod
        return mods[key]

    @staticmethod
    def _group(packed_seq_params) -> Any:
        """The micro-batch's SP group, carried by the data (None: degree 1); never parallel_state's."""
        group = getattr(packed_seq_params, "cp_group", None) if packed_seq_params is not None else None
        local = getattr(packed_seq_params, "local_cp_size", None) if packed_seq_params is not None else None
        if group is None:
            if local is not None and local != 1:
                raise ValueError(
                    f"packed_seq_params.local_cp_size is {local} but cp_group is not set: "
                    f"a group of degree > 1 must travel with its process group"
                )
            return None  # no group on the data: degree 1, no exchange
        if local is not None and local != group_size(group):
            raise ValueError(
                f"packed_seq_params.local_cp_size {local} differs from the size {group_size(group)} of its cp_group"
            )
        return group

    @staticmethod
    def _layout(packed_seq_params, total: int, device) -> tuple[torch.Tensor, int]:
        """(cu_seqlens of the packed group, max document length); one document when not packed."""
        if packed_seq_params is None:
            return torch.tensor([0, total], dtype=torch.int32), total
        cu = packed_seq_params.cu_seqlens_q_padded
        if cu is None:
            cu = packed_seq_params.cu_seqlens_q
        if cu is None:
            raise ValueError("packed_seq_params has no cu_seqlens_q: FlexSP attention needs document boundaries")
        kv = (
            packed_seq_params.cu_seqlens_kv_padded
            if packed_seq_params.cu_seqlens_kv_padded is not None
            else packed_seq_params.cu_seqlens_kv
        )
        if kv is not None and kv is not cu and not torch.equal(kv.cpu(), cu.cpu()):
            raise ValueError("FlexSP self-attention needs cu_seqlens_kv equal to cu_seqlens_q")
        max_len = packed_seq_params.max_seqlen_q
        if max_len is None:
            b = _bounds(cu)
            max_len = max(y - x for x, y in zip(b[:-1], b[1:]))
        return cu, int(max_len)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("FlexSPCoreAttention does not support attention_bias")
        if attn_mask_type is not None and attn_mask_type not in _CAUSAL_TYPES:
            raise NotImplementedError(f"FlexSPCoreAttention is causal-only; got attn_mask_type {attn_mask_type}")
        if query.dim() == 4:  # [s, b, h, d] (sbhd); packed rows have b == 1
            if query.shape[1] != 1:
                raise ValueError(f"FlexSPCoreAttention takes one packed row (batch 1), got batch {query.shape[1]}")
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        elif query.dim() != 3:  # thd: megatron squeezes the batch dim itself
            raise ValueError(f"query must be [s, 1, heads, dim] or [t, heads, dim], got shape {tuple(query.shape)}")
        s_local = query.shape[0]
        group = self._group(packed_seq_params)
        p = group_size(group)
        total = s_local * p
        cu, max_len = self._layout(packed_seq_params, total, query.device)
        low = query.dtype in LOW_PRECISION
        backend = self.backend
        if backend == "auto":
            backend = resolve_backend("auto", query.device, bf16=low)
        elif backend in _KERNEL_MODULES and not low:
            raise ValueError(
                f"attention backend '{backend}' needs bf16/fp16 tensors, got {query.dtype}: "
                f"run with --bf16, or use --attention-backend sdpa"
            )

        q, k, v = qkv_seq_to_head(query, key, value, group, self.a2a_stats)  # checks heads vs degree
        dropout_p = self.dropout_p if self.training else 0.0
        with sp_dropout_rng(dropout_p > 0 and backend != "te"):  # TE forks it itself (sp_dropout_tracker)
            out = varlen_causal_attention(
                q,
                k,
                v,
                cu,
                max_len,
                backend=backend,
                softmax_scale=self.softmax_scale,
                dropout_p=dropout_p,
                te_module=self._te_module(q.shape[1], k.shape[1]) if backend == "te" else None,
            )
        (out,) = head_to_seq([out], group, self.a2a_stats)
        return out.reshape(s_local, 1, -1)
