"""Architectures of the public checkpoints users continue to pre-train, and their cost-model presets.

Why here (torch-free, beside the cost-model presets): the trainer's ``--model-preset NAME`` sets
the architecture flags from this table, and ``--flexsp-cost-model NAME`` (or ``flexsp-plan``)
gets a cost model of the same shape from the analytic prior (``prior.py``), so planning a
Llama-3-8B run needs neither a GPU nor a profile. One table serves both.

Values are those of each model's published ``config.json`` on the Hugging Face Hub (the field
named in the comment), i.e. what ``transformers`` builds when loading that checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from .costmodel import CostModel
from .prior import ModelShape, analytic_cost_model

__all__ = ["ModelArch", "MODEL_ARCHS", "MODEL_PRESET_NAMES", "model_cost_preset", "H100_CLUSTER"]


@dataclass(frozen=True)
class ModelArch:
    """One checkpoint's architecture in Megatron's terms (config.json field -> Megatron flag)."""

    source: str  # the config.json the values come from
    num_layers: int  # num_hidden_layers
    hidden_size: int  # hidden_size
    ffn_hidden_size: int  # intermediate_size
    num_attention_heads: int  # num_attention_heads
    num_query_groups: int  # num_key_value_heads
    vocab_size: int  # vocab_size (the embedding table's rows)
    max_position_embeddings: int  # max_position_embeddings
    norm_epsilon: float  # rms_norm_eps
    rotary_base: int  # rope_theta
    use_rope_scaling: bool = False  # rope_scaling.rope_type == "llama3"
    rope_scaling_factor: float = 8.0  # rope_scaling.factor (low 1, high 4, original 8192: megatron's fixed values)
    add_qkv_bias: bool = False  # Qwen2: bias on q, k, v projections only
    untie_embeddings_and_output_weights: bool = True  # not tie_word_embeddings
    normalization: str = "RMSNorm"
    swiglu: bool = True  # hidden_act "silu" with gate_proj/up_proj

    def shape(self) -> ModelShape:
        return ModelShape(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            vocab_size=self.vocab_size,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            swiglu=self.swiglu,
        )


_HF = "https://huggingface.co/{}/blob/main/config.json"
MODEL_ARCHS: dict[str, ModelArch] = {
    "llama3-8b": ModelArch(
        source=_HF.format("meta-llama/Meta-Llama-3-8B"),
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        num_query_groups=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        norm_epsilon=1e-5,
        rotary_base=500000,
    ),
    # Llama 3.1: the 3.0 shape, 128K positions through rope_scaling {"rope_type": "llama3", "factor": 8.0,
    # "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}.
    "llama3.1-8b": ModelArch(
        source=_HF.format("meta-llama/Llama-3.1-8B"),
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        num_query_groups=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        norm_epsilon=1e-5,
        rotary_base=500000,
        use_rope_scaling=True,
        rope_scaling_factor=8.0,
    ),
    # Qwen2.5-7B (base): use_sliding_window false, tie_word_embeddings false (only the <= 3B ones tie).
    "qwen2.5-7b": ModelArch(
        source=_HF.format("Qwen/Qwen2.5-7B"),
        num_layers=28,
        hidden_size=3584,
        ffn_hidden_size=18944,
        num_attention_heads=28,
        num_query_groups=4,
        vocab_size=152064,
        max_position_embeddings=131072,
        norm_epsilon=1e-6,
        rotary_base=1000000,
        add_qkv_bias=True,
    ),
    # Mistral-7B v0.3: sliding_window null (v0.1's 4096-token window is not representable here).
    "mistral-7b": ModelArch(
        source=_HF.format("mistralai/Mistral-7B-v0.3"),
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        num_query_groups=8,
        vocab_size=32768,
        max_position_embeddings=32768,
        norm_epsilon=1e-5,
        rotary_base=1000000,
    ),
}
MODEL_PRESET_NAMES = tuple(MODEL_ARCHS)


@dataclass(frozen=True)
class Cluster:
    """The device and links a model's cost preset assumes (guesses the online calibration corrects)."""

    name: str
    device_flops: float  # dense bf16 peak FLOP/s of one GPU
    efficiency: float  # share of the peak the matmuls reach
    intra_node_gbs: float  # all-to-all GB/s per GPU inside a node
    inter_node_gbs: float  # all-to-all GB/s per GPU across nodes
    limit_gb: float  # usable memory per GPU
    gpus_per_node: int


# H100-SXM 80 GB: 989 TFLOP/s dense bf16 (NVIDIA's datasheet), 40% of it in the matmuls; NVLink 4 all-to-all
# ~150 GB/s per GPU; one 400 Gb/s NIC per GPU (~40 GB/s reached); 90% of 80 GB usable; 8 GPUs per node.
H100_CLUSTER = Cluster("H100-80G", 989e12, 0.4, 150.0, 40.0, 72.0, 8)


def model_cost_preset(name: str, world_size: int, cluster: Cluster = H100_CLUSTER) -> CostModel:
    """The analytic prior of model ``name`` on ``world_size`` GPUs of ``cluster`` (bf16, ZeRO-3).

    SP degrees whose all-to-all would split heads unevenly are left out of the bandwidth table
    (Qwen2.5-7B's 28 heads: degrees 2 and 4 only inside an 8-GPU node), so every degree the
    planner may choose is one the runtime can run.
    """
    arch = MODEL_ARCHS[name]
    cm = analytic_cost_model(
        arch.shape(),
        device_flops=cluster.device_flops,
        efficiency=cluster.efficiency,
        intra_node_gbs=cluster.intra_node_gbs,
        inter_node_gbs=cluster.inter_node_gbs,
        limit_gb=cluster.limit_gb,
        gpus_per_node=cluster.gpus_per_node,
        world_size=world_size,
        bytes_per_element=2,
        sharding="zero3",
        name=f"{name} on {cluster.name} x {world_size} (analytic prior, {arch.source})",
    )
    d = cm.to_dict()
    bw = d["alltoall"]["bandwidth_gbs"]
    d["alltoall"]["bandwidth_gbs"] = {k: v for k, v in bw.items() if arch.num_attention_heads % int(k) == 0}
    return CostModel.from_dict(d)
