"""Build megatron.core's GPTModel for FlexSP: config dataclass, FlexSP layer spec, deterministic init.

Why: every rank must start from bit-identical weights (ZeRO-3 shards them afterwards, plain data
parallel replicates them) and a single-process run with the same seed must start from the same
weights too, so correctness can be checked against it. Weights are therefore always initialised
on the CPU from a seeded CPU generator (``use_cpu_initialization``), then moved to the device.
RoPE follows the per-token position ids (which restart at every packed document), see
``flexsp_patches.rope``; learned-absolute positions use the ids natively.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["GPTConfig", "to_transformer_config", "build_gpt_model"]

_POS_TYPES = ("rope", "learned_absolute")
_NORMS = ("RMSNorm", "LayerNorm")
_IMPLS = ("local", "transformer_engine")
_BACKENDS = ("sdpa", "flash", "te", "auto")


@dataclass
class GPTConfig:
    """A GPT (Llama-style by default: RoPE, RMSNorm, SwiGLU, no biases) for megatron.core."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None
    vocab_size: int = 0
    max_position_embeddings: int = 0
    position_embedding_type: str = "rope"
    normalization: str = "RMSNorm"
    swiglu: bool = True
    attention_backend: str = "sdpa"
    transformer_impl: str = "local"
    params_dtype: torch.dtype = torch.float32
    bf16: bool = False
    init_method_std: float = 0.02
    seed: int = 1234
    # Additive extensions (defaults keep the interfaces.md behaviour).
    add_bias_linear: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    rotary_base: int = 10000
    qk_layernorm: bool = False
    share_embeddings_and_output_weights: bool = False
    kv_channels: int | None = None
    # Real checkpoints' architecture fields (issue 18): Llama uses eps 1e-5, Qwen2 1e-6 and a bias
    # on q, k, v only; Llama 3.1 rescales RoPE's inverse frequencies (megatron's ``rope_scaling``).
    norm_epsilon: float = 1e-5
    add_qkv_bias: bool = False
    use_rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    # Tensor parallelism (issue 20): megatron's TP layers over the unit of t consecutive ranks
    # (parallel_state's TP group); sequence_parallel is megatron's TP-sequence parallelism (NCCL only).
    tensor_model_parallel_size: int = 1
    sequence_parallel: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # passed to TransformerConfig as-is

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {v!r}")
        if self.position_embedding_type not in _POS_TYPES:
            raise ValueError(
                f"GPTConfig.position_embedding_type must be one of {_POS_TYPES}, got {self.position_embedding_type!r}"
            )
        if self.normalization not in _NORMS:
            raise ValueError(f"GPTConfig.normalization must be one of {_NORMS}, got {self.normalization!r}")
        if self.transformer_impl not in _IMPLS:
            raise ValueError(f"GPTConfig.transformer_impl must be one of {_IMPLS}, got {self.transformer_impl!r}")
        if self.attention_backend not in _BACKENDS:
            raise ValueError(f"GPTConfig.attention_backend must be one of {_BACKENDS}, got {self.attention_backend!r}")
        if self.attention_backend in ("flash", "te") and not self.bf16:
            # flash-attn rejects fp32; TE has no fp32 path for packed (THD) sequences.
            raise ValueError(f"GPTConfig.attention_backend {self.attention_backend!r} needs bf16=True")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"GPTConfig.hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        g = self.num_query_groups
        if g is not None and (g <= 0 or self.num_attention_heads % g):
            raise ValueError(
                f"GPTConfig.num_query_groups {g} must divide num_attention_heads {self.num_attention_heads}"
            )
        self._validate_tensor_parallel()
        if self.bf16 and self.params_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"GPTConfig.bf16 with params_dtype {self.params_dtype} is not supported")
        self._validate_checkpoint_fields()

    def _validate_tensor_parallel(self) -> None:
        """TP splits the heads and, first, GQA's kv heads over t ranks: both must divide by t."""
        t = self.tensor_model_parallel_size
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"GPTConfig.tensor_model_parallel_size must be a positive int, got {t!r}")
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % t or groups % t:
            raise ValueError(
                f"GPTConfig.tensor_model_parallel_size {t} must divide num_attention_heads "
                f"{self.num_attention_heads} and num_query_groups {groups} (TP splits the kv heads first)"
            )
        if self.sequence_parallel and t == 1:
            raise ValueError("GPTConfig.sequence_parallel needs tensor_model_parallel_size > 1")

    def _validate_checkpoint_fields(self) -> None:
        """The fields real checkpoints need (norm epsilon, RoPE scaling): finite, positive, consistent."""
        if not (
            isinstance(self.norm_epsilon, (int, float)) and math.isfinite(self.norm_epsilon) and self.norm_epsilon > 0
        ):
            raise ValueError(f"GPTConfig.norm_epsilon must be a finite number > 0, got {self.norm_epsilon!r}")
        f = self.rope_scaling_factor
        if not (isinstance(f, (int, float)) and math.isfinite(f) and f > 0):
            raise ValueError(f"GPTConfig.rope_scaling_factor must be a finite number > 0, got {f!r}")
        if self.use_rope_scaling and self.position_embedding_type != "rope":
            raise ValueError(
                f"GPTConfig.use_rope_scaling needs position_embedding_type='rope', got {self.position_embedding_type!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["params_dtype"] = str(self.params_dtype).replace("torch.", "")
        return d


def to_transformer_config(cfg: GPTConfig):
    """The megatron.core TransformerConfig for ``cfg`` (tp = cfg's, pp = cp = 1; fusions off).

    Fusions are off everywhere: on CPU they do not exist, and on GPU the ones that matter for
    FlexSP are in the attention backend; RoPE fusion in particular must stay off because FlexSP's
    per-token RoPE goes through megatron's unfused path (flexsp_patches.rope), and gradient
    accumulation fusion needs megatron's own DDP buffers (FlexSP uses FSDP2).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg.validate()
    kw: dict[str, Any] = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.kv_channels,
        normalization=cfg.normalization,
        gated_linear_unit=cfg.swiglu,
        activation_func=F.silu if cfg.swiglu else F.gelu,
        add_bias_linear=cfg.add_bias_linear,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        params_dtype=cfg.params_dtype,
        bf16=cfg.bf16,
        qk_layernorm=cfg.qk_layernorm,
        layernorm_epsilon=float(cfg.norm_epsilon),
        add_qkv_bias=cfg.add_qkv_bias,
        use_cpu_initialization=True,
        perform_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=1,
        context_parallel_size=1,
        sequence_parallel=cfg.sequence_parallel,
    )
    # Newer megatron-core versions may carry these on the config, and GPTModel then prefers the
    # config's value over its constructor argument: set them where the field exists.
    names = {f.name for f in fields(TransformerConfig)}
    if "position_embedding_type" in names:
        kw["position_embedding_type"] = cfg.position_embedding_type
    if "rotary_base" in names:
        kw["rotary_base"] = cfg.rotary_base
    kw.update(cfg.extra)
    return TransformerConfig(**kw)


def _check_tensor_parallel_setup(cfg: GPTConfig) -> None:
    """parallel_state's TP size must be the config's, and TP-sequence parallelism needs reduce-scatter (NCCL).

    Why here: megatron's TP layers take their group from parallel_state, so a mismatch would
    build layers of the wrong width; gloo has no reduce-scatter, which --sequence-parallel runs
    in every layer, so it fails at build, not in the first backward.
    """
    from megatron.core import parallel_state as ps

    t = cfg.tensor_model_parallel_size
    if t == 1 and not ps.model_parallel_is_initialized():
        return
    actual = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    if actual != t:
        raise ValueError(
            f"GPTConfig.tensor_model_parallel_size is {t} but megatron's parallel_state has TP size {actual}: "
            f"call flexsp_patches.cpu_compat.init_model_parallel(tensor_model_parallel_size={t}) first"
        )
    if cfg.sequence_parallel:
        import torch.distributed as dist

        backend = dist.get_backend(ps.get_tensor_model_parallel_group())
        if backend != "nccl":
            raise ValueError(
                f"--sequence-parallel needs a backend with reduce-scatter (NCCL); this run's TP group uses {backend}"
            )
        import importlib.util

        if cfg.transformer_impl == "local" and importlib.util.find_spec("apex") is None:
            raise ValueError(
                "--sequence-parallel needs --transformer-impl transformer_engine (or Apex's fused norms): "
                "megatron's torch norms of the local layer spec do not support it"
            )


def build_gpt_model(cfg: GPTConfig, *, device: torch.device | str | None = None, flexsp_attention: bool = True):
    """megatron.core GPTModel with FlexSP attention; identical weights for the same seed anywhere.

    ``flexsp_attention=False`` builds megatron's stock layer spec and stock RoPE (a reference
    model for tests and comparisons; it does not support packed sequences on CPU).
    Needs megatron parallel_state initialised (``flexsp_patches.cpu_compat.init_model_parallel``).
    The global RNG state (CPU and CUDA) is left as it was. Parameters are kept in ``cfg.params_dtype`` (fp32 by
    default); ``cfg.bf16`` makes the runtime compute in bf16 (FSDP2 mixed precision, or autocast
    for plain data parallel), with fp32 gradient reduction.
    """
    from megatron.core.models.gpt import GPTModel

    from flexsp_patches import cpu_compat, layer_specs, rope

    from .layer_spec import get_flexsp_layer_spec

    cpu_compat.apply(force_cpu=device is not None and torch.device(device).type == "cpu")
    tcfg = to_transformer_config(cfg)
    _check_tensor_parallel_setup(cfg)
    if flexsp_attention:
        spec = get_flexsp_layer_spec(
            cfg.transformer_impl,
            normalization=cfg.normalization,
            qk_layernorm=cfg.qk_layernorm,
            attention_backend=cfg.attention_backend,
        )
    else:
        spec = layer_specs.get_stock_layer_spec(
            cfg.transformer_impl, normalization=cfg.normalization, qk_layernorm=cfg.qk_layernorm
        )
    # Seed and restore the CPU generator only: torch.manual_seed would also reseed every CUDA
    # generator, which fork_rng(devices=[]) does not restore (megatron's CUDA RNG tracker and the
    # caller's CUDA stream of random numbers must stay as they were).
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(cfg.seed)
        model = GPTModel(
            config=tcfg,
            transformer_layer_spec=spec,
            vocab_size=cfg.vocab_size,
            max_sequence_length=cfg.max_position_embeddings,
            pre_process=True,
            post_process=True,
            parallel_output=True,
            share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
            position_embedding_type=cfg.position_embedding_type,
            rotary_base=cfg.rotary_base,
            rope_scaling=cfg.use_rope_scaling,
            rope_scaling_factor=float(cfg.rope_scaling_factor),
        )
    if getattr(model, "position_embedding_type", cfg.position_embedding_type) != cfg.position_embedding_type:
        raise RuntimeError(
            f"megatron GPTModel built with position embedding {model.position_embedding_type!r}, "
            f"not the requested {cfg.position_embedding_type!r}"
        )
    if flexsp_attention and cfg.position_embedding_type == "rope":
        rope.attach(model)
    model._flexsp_cfg = cfg  # read by shard_model / the executor (bf16 compute policy, heads)
    if device is not None:
        model = model.to(device)
    return model
