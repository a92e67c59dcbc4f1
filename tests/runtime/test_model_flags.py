"""The GPTConfig fields real checkpoints need (issue 18): norm epsilon, QKV bias, Llama 3.1 RoPE scaling,
tied or untied output layer, reaching megatron's TransformerConfig / GPTModel and FlexSP's per-token RoPE.

References are independent of the code under test: Llama 3.1's RoPE scaling written out here in
float64 from its published definition (Meta's llama-models / the ``rope_scaling`` of Llama-3.1's
config.json: factor 8, low_freq_factor 1, high_freq_factor 4, original context 8192), parameter
sets counted by hand, and for the whole model megatron's stock layer spec run one document per
forward (no packing, no all-to-all, no per-token RoPE patch).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.dist_utils import run_distributed

# Head dim 32 and rope base 500000 (Llama 3's): wavelengths from 6 to ~1.4M tokens, so all three bands
# of the scaling (kept, interpolated, divided by the factor) occur.
_SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=48)


def _cfg(**more):
    from megatron.flexsp.runtime.model import GPTConfig

    base = dict(_SHAPE, vocab_size=61, max_position_embeddings=64, seed=7, rotary_base=500000)
    return GPTConfig(**{**base, **more})


def llama31_inv_freq(dim: int, base: float, factor: float, low=1.0, high=4.0, original=8192) -> list[float]:
    """Llama 3.1's scaled RoPE inverse frequencies, float64, one frequency at a time."""
    out = []
    for i in range(0, dim, 2):
        f = base ** (-i / dim)
        wavelen = 2 * math.pi / f
        if wavelen < original / high:  # high frequency: unchanged
            out.append(f)
        elif wavelen > original / low:  # low frequency: slowed down by the factor
            out.append(f / factor)
        else:  # in between: linear blend of the two in 1/wavelength
            smooth = (original / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out


def test_llama31_formula_covers_all_bands():
    """The reference itself: with this head dim and base each band holds a frequency (so the tests below can fail)."""
    plain = llama31_inv_freq(32, 500000.0, 1.0)
    scaled = llama31_inv_freq(32, 500000.0, 8.0)
    ratios = [p / s for p, s in zip(plain, scaled)]
    assert any(r == 1.0 for r in ratios) and any(r == 8.0 for r in ratios)
    assert any(1.0 < r < 8.0 for r in ratios)


def test_gpt_config_checkpoint_field_validation():
    _cfg(norm_epsilon=1e-6, use_rope_scaling=True, rope_scaling_factor=4.0, add_qkv_bias=True).validate()
    for bad, match in [
        (dict(norm_epsilon=0.0), "norm_epsilon"),
        (dict(norm_epsilon=float("nan")), "norm_epsilon"),
        (dict(rope_scaling_factor=-1.0), "rope_scaling_factor"),
        (dict(rope_scaling_factor=float("inf")), "rope_scaling_factor"),
        (dict(use_rope_scaling=True, position_embedding_type="learned_absolute"), "use_rope_scaling needs"),
    ]:
        with pytest.raises(ValueError, match=match):
            _cfg(**bad).validate()


def test_fields_reach_transformer_config():
    from megatron.flexsp.runtime.model import to_transformer_config

    t = to_transformer_config(_cfg(norm_epsilon=1e-6, add_qkv_bias=True))
    assert (t.layernorm_epsilon, t.add_qkv_bias, t.add_bias_linear) == (1e-6, True, False)
    t = to_transformer_config(_cfg())
    assert (t.layernorm_epsilon, t.add_qkv_bias) == (1e-5, False)


def _build_body(rank, world_size):
    from flexsp_patches import cpu_compat
    from megatron.flexsp.runtime.model import build_gpt_model

    cpu_compat.init_model_parallel(seed=5, device_type="cpu")
    out = {}
    for name, cfg in {
        "qwen_like": _cfg(norm_epsilon=1e-6, add_qkv_bias=True, share_embeddings_and_output_weights=True),
        "llama_like": _cfg(use_rope_scaling=True, rope_scaling_factor=8.0),
        "factor4": _cfg(use_rope_scaling=True, rope_scaling_factor=4.0),
        "plain": _cfg(),
    }.items():
        m = build_gpt_model(cfg)
        rot = m.rotary_pos_emb
        rot._flexsp_position_ids = torch.tensor([[0, 1, 2, 0, 1, 9000, 30000]])
        per_token = rot(7).as_subclass(torch.Tensor).clone()
        rot._flexsp_position_ids = None
        eps = {n: mod.eps for n, mod in m.named_modules() if hasattr(mod, "eps") and "norm" in n}
        out[name] = dict(
            params={n: tuple(p.shape) for n, p in m.named_parameters()},
            inv_freq=rot.inv_freq.clone(),
            per_token=per_token,
            eps=eps,
            output_is_embedding=m.shared_embedding_or_output_weight() is m.embedding.word_embeddings.weight,
            output_weight=m.output_layer.weight is not None,
        )
    return out


@pytest.fixture(scope="module")
def built():
    (r,) = run_distributed(_build_body, 1, timeout=120)
    return r


def test_rope_scaling_uses_llama31_frequencies_in_the_per_token_path(built):
    dim = _SHAPE["hidden_size"] // _SHAPE["num_attention_heads"]
    pos = torch.tensor([0, 1, 2, 0, 1, 9000, 30000], dtype=torch.float64)
    for name, factor in (("llama_like", 8.0), ("factor4", 4.0), ("plain", 1.0)):
        want = torch.tensor(llama31_inv_freq(dim, 500000.0, factor), dtype=torch.float64)
        got = built[name]["inv_freq"].double()
        assert torch.allclose(got, want, rtol=1e-6, atol=0), (name, got, want)
        # FlexSP's per-token RoPE: positions (restarting per document) times the scaled frequencies
        freqs = pos[:, None] * want[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]  # [s, b, 1, d], halves repeated
        got_pt = built[name]["per_token"].double()
        assert got_pt.shape == emb.shape
        assert torch.allclose(got_pt, emb, rtol=1e-5, atol=1e-6), name
    assert not torch.allclose(built["llama_like"]["inv_freq"], built["plain"]["inv_freq"])


def test_qkv_bias_only_on_qkv_and_norm_epsilon(built):
    q = built["qwen_like"]
    biases = sorted(n for n in q["params"] if n.endswith("bias"))
    assert biases == [f"decoder.layers.{i}.self_attention.linear_qkv.bias" for i in range(2)]
    # q (2 heads x 32) + k, v (1 group x 32 each)
    assert q["params"]["decoder.layers.0.self_attention.linear_qkv.bias"] == (128,)
    assert not any(n.endswith("bias") for n in built["plain"]["params"])
    # every norm (2 per layer + the final one) takes the configured epsilon
    assert len(q["eps"]) == 5 and set(q["eps"].values()) == {1e-6}
    assert set(built["plain"]["eps"].values()) == {1e-5}


def test_tied_and_untied_parameter_sets(built):
    tied, untied = built["qwen_like"]["params"], built["plain"]["params"]
    assert set(untied) - set(tied) == {"output_layer.weight"}
    assert untied["output_layer.weight"] == untied["embedding.word_embeddings.weight"] == (61, 64)
    assert built["qwen_like"]["output_is_embedding"] and not built["qwen_like"]["output_weight"]
    assert built["plain"]["output_weight"]
    # parameter counts by hand: qkv (64+32+32)x64, proj 64x64, fc1 2x48x64, fc2 64x48, 2 norms; final norm
    h, f, v = 64, 48, 61
    layer = (h + 32 + 32) * h + h * h + 2 * f * h + h * f + 2 * h
    n_untied = 2 * layer + 2 * v * h + h
    assert sum(math.prod(s) for s in untied.values()) == n_untied
    assert sum(math.prod(s) for s in tied.values()) == n_untied - v * h + 2 * 128  # + qkv biases


# ------------------------------------------------------ whole model vs megatron's stock spec, 2 gloo ranks
_POOL = [(0,), (1,), (0, 1)]


def _plans():
    from megatron.flexsp.planner.plan import Group, MicroBatch, Plan

    return [
        Plan(2, [9, 5, 12, 7], [MicroBatch([Group([0, 1], [0, 1])]), MicroBatch([Group([0], [2]), Group([1], [3])])]),
        Plan(2, [6, 11, 4], [MicroBatch([Group([0, 1], [1, 2, 0])])]),
    ]


def _docs():
    g = torch.Generator().manual_seed(3)
    return [[torch.randint(0, 61, (n + 1,), generator=g) for n in p.lengths] for p in _plans()]


def _checkpoint_cfg():
    # every field at once: Qwen's eps and QKV bias, tied output, Llama 3.1 scaling
    return _cfg(norm_epsilon=1e-6, add_qkv_bias=True, share_embeddings_and_output_weights=True, use_rope_scaling=True)


def _reference():
    from megatron.flexsp.runtime.model import build_gpt_model

    model = build_gpt_model(_checkpoint_cfg(), flexsp_attention=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for docs in _docs():
        total = sum(d.numel() - 1 for d in docs)
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for d in docs:
            n = d.numel() - 1
            part = model(d[None, :-1], torch.arange(n)[None], None, labels=d[None, 1:]).sum() / total
            part.backward()
            loss += float(part.detach())
        opt.step()
        losses.append(loss)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _flexsp_body(rank, world_size):
    from flexsp_patches import cpu_compat
    from megatron.flexsp.runtime.executor import FlexSPExecutor
    from megatron.flexsp.runtime.group_pool import GroupPool
    from megatron.flexsp.runtime.model import build_gpt_model
    from megatron.flexsp.runtime.sharding import full_state_dict, shard_model

    cpu_compat.init_model_parallel(seed=3, device_type="cpu")
    model = build_gpt_model(_checkpoint_cfg())
    shard_model(model, "fsdp2")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ex = FlexSPExecutor(model, GroupPool(_POOL), sharding_mode="fsdp2")
    losses = []
    for plan, docs in zip(_plans(), _docs()):
        opt.zero_grad(set_to_none=True)
        losses.append(ex.run(plan, docs).loss)
        opt.step()
    final = full_state_dict(model)
    return dict(losses=losses, final=final, ref=_reference() if rank == 0 else None)


@pytest.mark.slow  # 2 gloo ranks, ~12 s on 2 cores
def test_checkpoint_fields_train_like_the_stock_model_under_flexsp_groups():
    """Tied output, QKV bias, eps 1e-6 and Llama 3.1 RoPE scaling under SP groups of degree 2 and 1 (FSDP2)
    give the losses and updated weights of megatron's stock model run one document at a time."""
    r = run_distributed(_flexsp_body, 2, timeout=240)
    ref_losses, ref_final = r[0]["ref"]
    assert r[0]["losses"] == r[1]["losses"]
    assert torch.allclose(torch.tensor(r[0]["losses"]), torch.tensor(ref_losses), rtol=1e-6, atol=0)
    final = r[0]["final"]
    assert "output_layer.weight" not in final and set(final) == set(ref_final)
    for n, ref in ref_final.items():
        assert torch.allclose(final[n], ref, rtol=1e-5, atol=1e-6), n


def test_prior_counts_the_built_models_parameters(built):
    """The planner's analytic prior counts what megatron builds: the output layer once when tied
    (the prior leaves biases out)."""
    from megatron.flexsp.planner.prior import ModelShape, num_parameters

    shape = dict(num_layers=2, hidden_size=64, num_attention_heads=2, vocab_size=61, num_query_groups=1)
    shape.update(ffn_hidden_size=48, swiglu=True)
    untied = sum(math.prod(s) for s in built["plain"]["params"].values())
    tied = sum(math.prod(s) for n, s in built["qwen_like"]["params"].items() if not n.endswith("bias"))
    assert num_parameters(ModelShape(**shape)) == untied
    assert num_parameters(ModelShape(**shape, tied_embeddings=True)) == tied
