"""flexsp-profile's recompute entry (contract C4): measured per mode on the trainer's runtime, on 2 gloo ranks.

References: the activation slopes against the closed-form model of the same shape (written from
the shape alone, see runtime.recompute), the all-to-all factors against the runtime's structure
(full re-runs every exchange of the forward; a recomputed core attention its q/k/v exchange),
and the cost model's own parser, which must accept the written entry.
"""

from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed


def _body(rank, world_size, modules):
    from flexsp_patches import cpu_compat
    from megatron.flexsp.runtime.model import GPTConfig
    from megatron.flexsp.runtime.recompute import activation_bytes_per_token
    from megatron.flexsp.training.profile_config import ProfileConfig
    from megatron.flexsp.training.profile_memory import profile_memory
    from megatron.flexsp.training.profile_recompute import profile_recompute, recompute_configs
    from megatron.flexsp.training.profile_session import ProfileSession

    cpu_compat.init_model_parallel(seed=1, device_type="cpu")
    cfg = GPTConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=61, max_position_embeddings=128, seed=3
    )
    pcfg = ProfileConfig(max_len=128, repeats=1, warmup=0, capacity_tokens=256, recompute_modules=modules)
    import torch

    ses = ProfileSession(cfg, pcfg, torch.device("cpu"), 61)
    memory = profile_memory(ses, pcfg, torch.device("cpu"), lambda *_: None)
    entry, raw = profile_recompute(ses, pcfg, memory, lambda *_: None)
    model = {
        m: activation_bytes_per_token(cfg, rc.spec_for(), packed=False) / 2**20
        for m, rc in recompute_configs(pcfg).items()
    }
    model["none"] = activation_bytes_per_token(cfg, packed=False) / 2**20
    return entry, raw, memory["activation_mb_per_token"], model


@pytest.mark.parametrize("modules", [None, pytest.param(["core_attn", "mlp"], marks=pytest.mark.slow)])
def test_profile_recompute_entry(modules):
    from megatron.flexsp.planner.costmodel import CostModel, build_cost_model

    results = run_distributed(_body, 2, modules, timeout=240)
    entry, raw, none_mb, model = results[0]
    assert all(r[0] == entry for r in results)  # every rank reports the same (collective maxima)
    assert none_mb == pytest.approx(model["none"], rel=0.01)
    for m in ("selective", "full"):
        assert entry[m]["activation_mb_per_token"] == pytest.approx(model[m], rel=0.01), m
        assert entry[m]["compute_factor"] >= 1.0
    assert entry["full"]["activation_mb_per_token"] < 0.5 * none_mb
    # all-to-all bytes in one group of both ranks: full adds one forward's worth (2F -> 3F)
    assert entry["full"]["alltoall_factor"] == pytest.approx(1.5)
    # core attention re-exchanges q, k, v (12 head-chunks of 16) but not the output (4): 1 + 12 / (2 * 16)
    assert entry["selective"]["alltoall_factor"] == pytest.approx(1.375)
    assert set(raw["time_ratio"]) == {"selective", "full"}
    # the entry is what the cost model's "recompute" key reads
    cost = build_cost_model(
        name="t",
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=4,
        gpus_per_node=2,
        alpha1_ms_per_token2=1e-6,
        alpha2_ms_per_token=0.1,
        beta1_ms=1.0,
        bandwidth_gbs={2: 1.0},
        limit_gb=1.0,
        model_states_mb=1.0,
        activation_mb_per_token=none_mb,
    )
    d = cost.to_dict()
    d["recompute"] = entry
    back = CostModel.from_dict(d)
    assert back.recompute["full"].alltoall_factor == pytest.approx(1.5)
    if modules:  # the MLP recomputed too: less memory than core_attn alone would keep
        assert entry["selective"]["activation_mb_per_token"] < 0.8 * none_mb
