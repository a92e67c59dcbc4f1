"""Narrow patches so megatron.core's GPTModel trains on a CPU-only torch (development and CI).

Why: megatron.core assumes CUDA in a few places on the paths FlexSP uses: the RoPE module moves
its frequencies to ``torch.cuda.current_device()`` on first use; the RNG tracker
(``get_cuda_rng_tracker`` / ``model_parallel_cuda_manual_seed``) and activation recomputation
store and swap CUDA generator states; the local attention's scratch buffer and default causal
mask are allocated on CUDA. Each patch below names exactly what it replaces and is installed only where CUDA is not
available, so GPU runs execute megatron.core unchanged. Fused kernels (bias-gelu, masked
softmax, RoPE fusion, gradient-accumulation fusion) are not patched but switched off in the
model config (see ``megatron.flexsp.runtime.model.to_transformer_config``).

``apply()`` is idempotent; ``init_model_parallel()`` initialises megatron.core.parallel_state
with pipeline = context parallel size 1 and tensor parallel size t (default 1) on top of an
initialised torch.distributed (gloo or NCCL): FlexSP's sequence parallelism lives in its own
group pool, not in megatron's static context-parallel group.
"""

from __future__ import annotations

import contextlib
import logging

import torch

__all__ = ["apply", "applied", "cuda_available", "init_model_parallel", "CPURNGStatesTracker"]

_APPLIED = False
log = logging.getLogger(__name__)


def cuda_available() -> bool:
    """True when this process can run CUDA kernels (a CUDA build with a visible device)."""
    return bool(torch.cuda.is_available())


def applied() -> bool:
    """True once the CPU patches are installed in this process."""
    return _APPLIED


# --------------------------------------------------------------------------- RNG tracker
def _tracker_base():
    from megatron.core.tensor_parallel import random as mrandom

    return mrandom.CudaRNGStatesTracker


class CPURNGStatesTracker(_tracker_base()):  # type: ignore[misc]
    """Replaces megatron.core.tensor_parallel.random.CudaRNGStatesTracker on CPU.

    Same bookkeeping (named states, distinct seeds, ``fork`` context), but the states are CPU
    generator states (``torch.get_rng_state``/``torch.set_rng_state``) instead of
    ``torch.cuda.get_rng_state``/``_set_cuda_rng_state``, which fail without CUDA.
    """

    def add(self, name, seed):  # replaces CudaRNGStatesTracker.add (torch.cuda.manual_seed/get_rng_state)
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name=None):  # replaces CudaRNGStatesTracker.fork (_get/_set_cuda_rng_state)
        from megatron.core.tensor_parallel import random as mrandom

        if name is None:
            name = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        orig_name = self._current_state_name
        if orig_name != "default-rng":
            self.states_[orig_name] = orig
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(f"current rng state name {self._current_state_name} is not {name}")
            self.states_[name] = torch.get_rng_state()
            if orig_name != "default-rng":
                orig = self.states_[orig_name]
            torch.set_rng_state(orig)
            self._current_state_name = orig_name


def _patch_cuda_rng_state() -> None:
    """CPU stand-ins for megatron's CUDA generator state helpers.

    Replaces ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` of megatron.core.tensor_parallel.
    random (module globals used by activation recomputation: ``CheckpointFunction`` saves and
    restores "all RNG states" around the recomputed forward), which call torch.cuda; on CPU the
    device generator *is* the CPU generator, so they read and write ``torch.get/set_rng_state``.
    """
    from megatron.core.tensor_parallel import random as mrandom

    if getattr(mrandom._get_cuda_rng_state, "_flexsp_cpu", False):
        return

    def _get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set_cuda_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    _get_cuda_rng_state._flexsp_cpu = True  # type: ignore[attr-defined]
    mrandom._get_cuda_rng_state = _get_cuda_rng_state
    mrandom._set_cuda_rng_state = _set_cuda_rng_state


def _patch_rng_tracker() -> None:
    """Make every tracker megatron creates a CPURNGStatesTracker.

    Replaces ``megatron.core.tensor_parallel.random.initialize_rng_tracker`` (module global, looked
    up at call time by ``get_cuda_rng_tracker`` and ``model_parallel_cuda_manual_seed``): after the
    original creates its CudaRNGStatesTracker, the instance's class is switched to the CPU one.
    """
    from megatron.core.tensor_parallel import random as mrandom

    orig = mrandom.initialize_rng_tracker
    if getattr(orig, "_flexsp_cpu", False):
        return

    def initialize_rng_tracker(*args, **kwargs):
        orig(*args, **kwargs)
        tr = mrandom._CUDA_RNG_STATE_TRACKER
        if type(tr) is mrandom.CudaRNGStatesTracker:
            tr.__class__ = CPURNGStatesTracker

    initialize_rng_tracker._flexsp_cpu = True  # type: ignore[attr-defined]
    mrandom.initialize_rng_tracker = initialize_rng_tracker
    if (
        mrandom._CUDA_RNG_STATE_TRACKER is not None
        and type(mrandom._CUDA_RNG_STATE_TRACKER) is mrandom.CudaRNGStatesTracker
    ):
        mrandom._CUDA_RNG_STATE_TRACKER.__class__ = CPURNGStatesTracker


# --------------------------------------------------------------------------------- RoPE
def _patch_rope() -> None:
    """Keep RoPE frequencies on the CPU.

    Replaces ``RotaryEmbedding.get_emb`` of megatron.core.models.common.embeddings.
    rotary_pos_embedding, whose first statement moves ``inv_freq`` to
    ``torch.cuda.current_device()``; the rest (frequencies, interleaving, [s, 1, 1, d] shape)
    is megatron's own ``get_freqs_non_repeated`` plus the same concatenation.
    """
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    if getattr(RotaryEmbedding.get_emb, "_flexsp_cpu", False):
        return

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
        return emb[:, None, None, :]

    get_emb._flexsp_cpu = True  # type: ignore[attr-defined]
    RotaryEmbedding.get_emb = get_emb


# ------------------------------------------------------------------ global memory buffer
def _patch_memory_buffer() -> None:
    """Allocate megatron's scratch buffers on the CPU.

    Replaces ``megatron.core.utils.GlobalMemoryBuffer.get_tensor`` (used by the local
    DotProductAttention for its baddbmm output), which allocates on
    ``torch.cuda.current_device()``; same reuse-by-(name, dtype) logic, CPU device.
    """
    import operator
    from functools import reduce

    from megatron.core.utils import GlobalMemoryBuffer

    if getattr(GlobalMemoryBuffer.get_tensor, "_flexsp_cpu", False):
        return

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        required_len = reduce(operator.mul, tensor_shape, 1)
        buf = self.buffer.get((name, dtype), None)
        if buf is None or buf.numel() < required_len:
            buf = torch.empty(required_len, dtype=dtype, device="cpu", requires_grad=False)
            self.buffer[(name, dtype)] = buf
        return buf[0:required_len].view(*tensor_shape)

    get_tensor._flexsp_cpu = True  # type: ignore[attr-defined]
    GlobalMemoryBuffer.get_tensor = get_tensor


# ------------------------------------------------------------------------ causal mask
def _patch_causal_mask() -> None:
    """Build the default causal mask on the CPU.

    Replaces ``megatron.core.transformer.utils.get_default_causal_mask`` and the name that
    megatron.core.fusions.fused_softmax imported from it (used by the unfused softmax of the
    local DotProductAttention when no mask is passed), which allocate with ``device="cuda"``.
    """
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    if getattr(tutils.get_default_causal_mask, "_flexsp_cpu", False):
        return

    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    get_default_causal_mask._flexsp_cpu = True  # type: ignore[attr-defined]
    tutils.get_default_causal_mask = get_default_causal_mask
    if hasattr(fused_softmax, "get_default_causal_mask"):
        fused_softmax.get_default_causal_mask = get_default_causal_mask


def apply(force_cpu: bool = False) -> None:
    """Install the CPU patches (idempotent).

    By default they are installed only where CUDA is not available, so GPU runs execute
    megatron.core unchanged. ``force_cpu=True`` installs them anyway, for a CPU-only run (gloo,
    CPU tensors) on a machine that has a GPU.
    """
    global _APPLIED
    if _APPLIED:
        return
    if force_cpu or not cuda_available():
        _patch_rng_tracker()
        _patch_cuda_rng_state()
        _patch_rope()
        _patch_memory_buffer()
        _patch_causal_mask()
        _APPLIED = True


def init_model_parallel(
    seed: int = 1234, *, device_type: str | None = None, tensor_model_parallel_size: int | None = None
) -> None:
    """Initialise megatron.core.parallel_state (tp = t, pp = cp = 1) and megatron's RNG tracker.

    Needs torch.distributed initialised (any backend). ``device_type="cpu"`` forces the CPU
    patches even where CUDA exists (default: by availability). With ``tensor_model_parallel_size``
    t > 1 megatron's TP groups are the units of t consecutive ranks (its default order), so its
    data-parallel group of a rank is the ranks with the same TP rank, one per unit: the ranks
    FlexSP's SP groups and FSDP2 work over. Idempotent: an already initialised parallel_state is
    kept (and the tracker reseeded) if it has pp = 1 and the requested tp (None: any tp, so a later
    call that only reseeds keeps the run's TP), and rejected with a clear error otherwise.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    apply(force_cpu=device_type == "cpu")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "init_model_parallel: torch.distributed is not initialised; call torch.distributed.init_process_group first"
        )
    if tensor_model_parallel_size is None:
        keep = ps.model_parallel_is_initialized()
        tensor_model_parallel_size = ps.get_tensor_model_parallel_world_size() if keep else 1
    t = int(tensor_model_parallel_size)
    if t < 1 or dist.get_world_size() % t:
        raise ValueError(
            f"init_model_parallel: tensor_model_parallel_size {tensor_model_parallel_size} must be a positive "
            f"divisor of the world size {dist.get_world_size()}"
        )
    if ps.model_parallel_is_initialized():
        tp = ps.get_tensor_model_parallel_world_size()
        pp = ps.get_pipeline_model_parallel_world_size()
        if tp != t or pp != 1:
            raise RuntimeError(
                f"init_model_parallel: megatron parallel_state already initialised with "
                f"tp={tp}, pp={pp}; this run needs tp={t}, pp=1"
            )
    else:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=t, pipeline_model_parallel_size=1, context_parallel_size=1
        )
    if device_type == "cpu" or not cuda_available():
        etp = getattr(ps, "get_expert_tensor_parallel_rank", ps.get_tensor_model_parallel_rank)()
        _seed_cpu_tracker(seed, ps.get_tensor_model_parallel_rank(), etp)  # megatron's calls torch.cuda
    else:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


# megatron.core's tracker state names (module constants since 0.5; the defaults are their values).
_TRACKER_NAMES = (
    ("_DATA_PARALLEL_RNG_TRACKER_NAME", "data-parallel-rng"),
    ("_MODEL_PARALLEL_RNG_TRACKER_NAME", "model-parallel-rng"),
    ("_EXPERT_PARALLEL_RNG_TRACKER_NAME", "expert-parallel-rng"),
)


def _seed_cpu_tracker(seed: int, tp_rank: int = 0, etp_rank: int = 0) -> None:
    """``model_parallel_cuda_manual_seed`` for a CPU run: same states and seeds, no torch.cuda call.

    Why: megatron's version calls ``torch.cuda.manual_seed``, which on a GPU node queues CUDA
    work for a gloo run that must never touch the GPU. ep = etp = 1 here (FlexSP's layout), so
    the offsets are megatron's: data seed, seed + 2718 + TP rank (dropout inside a TP partition
    differs per partition, as in megatron), seed + 1024 + expert-TP rank.
    """
    from megatron.core.tensor_parallel import random as mrandom

    data, model, expert = (getattr(mrandom, attr, default) for attr, default in _TRACKER_NAMES)
    mrandom.initialize_rng_tracker()  # patched by apply(): a CPURNGStatesTracker
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(data, seed)
    tracker.add(model, seed + 2718 + tp_rank)
    tracker.add(expert, seed + 1024 + etp_rank)
