"""Model building, per-token RoPE and CPU compatibility of megatron.core (runtime.model, flexsp_patches)."""

from __future__ import annotations

import dataclasses
import functools
import types
import warnings

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.runtime.tiny_model import tiny_gpt_config


def _rope_module(dim: int, interleaved: bool = False):
    from flexsp_patches import cpu_compat

    cpu_compat.apply(force_cpu=True)
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    return RotaryEmbedding(
        kv_channels=dim, rotary_percent=1.0, rotary_interleaved=interleaved, use_cpu_initialization=True
    )


@pytest.mark.parametrize("interleaved", [False, True])
def test_per_token_freqs_match_megatron_positions(interleaved):
    from flexsp_patches.rope import per_token_freqs

    rot = _rope_module(8, interleaved)
    ref = rot.get_emb(11)  # megatron: positions 0..10, [s, 1, 1, d]
    pos = torch.arange(11)[None]
    got = per_token_freqs(rot.inv_freq, pos, rotary_interleaved=interleaved)
    assert got.shape == ref.shape
    assert torch.equal(got, ref)
    # Restarting positions pick the same rows as megatron's table.
    pos2 = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    got2 = per_token_freqs(rot.inv_freq, pos2, rotary_interleaved=interleaved)
    assert torch.equal(got2, ref[pos2[0]])


def test_patched_rope_apply_follows_positions_in_thd():
    """THD tensors with tagged per-token freqs rotate each document from position 0 (cu_seqlens ignored)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.transformer import attention as mattn

    from flexsp_patches import rope

    rope.install()
    rope.install()  # idempotent
    rot = _rope_module(8)
    cfg = types.SimpleNamespace(
        rotary_interleaved=False, multi_latent_attention=False, apply_rope_fusion=False, mrope_section=None
    )
    lens = [3, 5, 2]
    torch.manual_seed(0)
    t = torch.randn(sum(lens), 4, 8)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    # A slice of the packed group (what one SP rank holds): cu_seqlens describe the whole group,
    # the frequencies come from the slice's own position ids.
    freqs = rope.per_token_freqs(rot.inv_freq, pos[:, 2:7])
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # megatron-core 0.19 renamed the MLA flag
        got = mattn.apply_rotary_pos_emb(t[2:7], freqs, config=cfg, cu_seqlens=cu)
    ref_parts, start = [], 0
    for n in lens:  # megatron's own rotation of every document separately, positions 0..n-1
        ref_parts.append(_apply_rotary_pos_emb_bshd(t[start : start + n].unsqueeze(1), rot.get_emb(n)).squeeze(1))
        start += n
    ref = torch.cat(ref_parts)[2:7]
    assert torch.equal(got, ref)
    # Untagged frequencies still go through megatron's original function.
    plain = rot.get_emb(10)
    a = mattn.apply_rotary_pos_emb(t.unsqueeze(1), plain, config=cfg, cp_group=object())  # bshd: group unused
    assert torch.equal(a, _apply_rotary_pos_emb_bshd(t.unsqueeze(1), plain))
    with pytest.raises(RuntimeError, match="per-token frequencies"):
        mattn.apply_rotary_pos_emb(t[:4], freqs, config=cfg, cu_seqlens=cu)


def test_rope_passes_the_mla_flag_under_the_name_megatron_takes():
    """0.16's _apply_rotary_pos_emb_bshd knows multi_latent_attention; 0.19 renamed it to
    mla_rotary_interleaved (the old name warns on every call). Signature inspected once."""
    from flexsp_patches.rope import bshd_caller

    seen = []

    def old_bshd(t, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0):
        seen.append(("old", rotary_interleaved, multi_latent_attention, mscale))
        return t

    def new_bshd(
        t, freqs, rotary_interleaved=False, mla_rotary_interleaved=False, mscale=1.0, multi_latent_attention=None
    ):
        if multi_latent_attention is not None:
            warnings.warn("multi_latent_attention is deprecated", DeprecationWarning, stacklevel=2)
        seen.append(("new", rotary_interleaved, mla_rotary_interleaved, mscale))
        return t

    t = torch.zeros(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for fn in (old_bshd, new_bshd):
            call = bshd_caller(fn)
            call(t, t, rotary_interleaved=True, mla=True, mscale=0.5)
            call(t, t, rotary_interleaved=False, mla=False, mscale=1.0)
    assert seen == [
        ("old", True, True, 0.5),
        ("old", False, False, 1.0),
        ("new", True, True, 0.5),
        ("new", False, False, 1.0),
    ]
    assert bshd_caller(old_bshd).mla_name == "multi_latent_attention"
    assert bshd_caller(new_bshd).mla_name == "mla_rotary_interleaved"


def test_cpu_rng_tracker_forks_and_restores():
    from flexsp_patches import cpu_compat

    cpu_compat.apply(force_cpu=True)
    cpu_compat.apply(force_cpu=True)
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    tr = tensor_parallel.get_cuda_rng_tracker()
    assert isinstance(tr, cpu_compat.CPURNGStatesTracker)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tr.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # default stream untouched
    with tr.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the forked stream advanced
    tensor_parallel.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        a2 = torch.rand(3)
    assert torch.equal(a, a2)  # reseeding reproduces the stream


def test_gpt_config_validation():
    from megatron.flexsp.runtime.model import GPTConfig

    ok = dict(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    GPTConfig(**ok).validate()
    for bad, match in [
        (dict(position_embedding_type="alibi"), "position_embedding_type"),
        (dict(num_query_groups=3), "num_query_groups"),
        (dict(hidden_size=30), "hidden_size"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(normalization="Batch"), "normalization"),
        (dict(attention_backend="magic"), "attention_backend"),
        (dict(attention_backend="flash"), "'flash' needs bf16"),
        (dict(attention_backend="te"), "'te' needs bf16"),
        (dict(transformer_impl="jax"), "transformer_impl"),
    ]:
        with pytest.raises(ValueError, match=match):
            GPTConfig(**{**ok, **bad}).validate()
    for backend in ("flash", "te", "auto", "sdpa"):
        GPTConfig(**ok, attention_backend=backend, bf16=True).validate()


# ----------------------------------------------------------------- model building (1 process)
def _tiny(pos: str, seed: int = 1234):
    return tiny_gpt_config(pos, vocab_size=50, max_position_embeddings=40, seed=seed)


def _build_body(rank, world_size):
    import torch

    from flexsp_patches import cpu_compat
    from megatron.flexsp.runtime.model import build_gpt_model

    cpu_compat.init_model_parallel(seed=5, device_type="cpu")
    out = {}
    # CUDA generators must be left alone (fork_rng(devices=[]) would not restore them): record
    # every call that would (re)seed them, lazily queued or not.
    cuda_seeds = []
    real = torch.cuda.manual_seed, torch.cuda.manual_seed_all
    torch.cuda.manual_seed = lambda s: cuda_seeds.append(("manual_seed", s))
    torch.cuda.manual_seed_all = lambda s: cuda_seeds.append(("manual_seed_all", s))
    try:
        for pos in ("rope", "learned_absolute"):
            torch.random.default_generator.manual_seed(99)
            rng_before = torch.get_rng_state()
            a = build_gpt_model(_tiny(pos), flexsp_attention=False)
            out[f"{pos}_rng_kept"] = torch.equal(rng_before, torch.get_rng_state())
            out[f"{pos}_models"] = a
    finally:
        torch.cuda.manual_seed, torch.cuda.manual_seed_all = real
    out["cuda_seeds"] = cuda_seeds
    for pos in ("rope", "learned_absolute"):
        a = out.pop(f"{pos}_models")
        b = build_gpt_model(_tiny(pos), flexsp_attention=False)
        c = build_gpt_model(_tiny(pos, seed=1), flexsp_attention=False)
        sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
        out[f"{pos}_same_seed_equal"] = all(torch.equal(sa[k], sb[k]) for k in sa if torch.is_tensor(sa[k]))
        out[f"{pos}_other_seed_differs"] = any(
            not torch.equal(sa[k], sc[k]) for k in sa if torch.is_tensor(sa[k]) and sa[k].numel() > 1
        )
        names = [n for n, _ in a.named_parameters()]
        out[f"{pos}_has_pos_emb"] = any("position_embeddings" in n for n in names)
        out[f"{pos}_gqa"] = tuple(a.decoder.layers[0].self_attention.linear_qkv.weight.shape)
        # Forward/backward of megatron's stock model on CPU with the CPU patches.
        ids = torch.randint(0, 50, (1, 12))
        losses = a(ids, torch.arange(12)[None], None, labels=ids)
        losses.sum().backward()
        out[f"{pos}_loss_shape"] = tuple(losses.shape)
        out[f"{pos}_finite_grads"] = all(p.grad is not None and torch.isfinite(p.grad).all() for p in a.parameters())
    return out


def test_build_gpt_model_deterministic_and_runs_on_cpu():
    (r,) = run_distributed(_build_body, 1, timeout=120)
    assert r["cuda_seeds"] == []
    for pos in ("rope", "learned_absolute"):
        assert r[f"{pos}_rng_kept"]
        assert r[f"{pos}_same_seed_equal"]
        assert r[f"{pos}_other_seed_differs"]
        assert r[f"{pos}_loss_shape"] == (1, 12)
        assert r[f"{pos}_finite_grads"]
        # GQA: q (4 heads x 8) + k, v (2 groups x 8 each) = 64 rows.
        assert r[f"{pos}_gqa"] == (64, 32)
    assert r["learned_absolute_has_pos_emb"] and not r["rope_has_pos_emb"]


# ---------------------------------------------------------------------------- layer specs
def test_flexsp_layer_spec_swaps_only_core_attention():
    from flexsp_patches.layer_specs import get_stock_layer_spec
    from megatron.flexsp.runtime.attention import FlexSPCoreAttention
    from megatron.flexsp.runtime.layer_spec import get_flexsp_layer_spec

    stock = get_stock_layer_spec("local", normalization="RMSNorm")
    flex = get_flexsp_layer_spec("local", normalization="RMSNorm", attention_backend="sdpa")
    core = flex.submodules.self_attention.submodules.core_attention
    assert core.module is FlexSPCoreAttention and core.params == {"backend": "sdpa"}
    assert stock.submodules.self_attention.submodules.core_attention is not core  # stock spec not mutated
    for name in ("linear_qkv", "linear_proj", "q_layernorm", "k_layernorm"):
        assert _same_spec(
            getattr(flex.submodules.self_attention.submodules, name),
            getattr(stock.submodules.self_attention.submodules, name),
        ), name
    for name in ("input_layernorm", "pre_mlp_layernorm", "mlp", "self_attn_bda", "mlp_bda"):
        assert _same_spec(getattr(flex.submodules, name), getattr(stock.submodules, name)), name
    # the comparison is not vacuous: a different partial or module differs
    assert not _same_spec(functools.partial(max, 1), functools.partial(max, 2))
    assert not _same_spec(flex.submodules.mlp, flex.submodules.self_attention)


def _same_spec(a, b) -> bool:
    """Structural equality of layer-spec entries. megatron-core 0.19 builds some entries as fresh
    ``functools.partial`` objects per spec call, and partials compare by identity."""
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):
        return (
            _same_spec(a.func, b.func)
            and len(a.args) == len(b.args)
            and all(_same_spec(x, y) for x, y in zip(a.args, b.args))
            and a.keywords.keys() == b.keywords.keys()
            and all(_same_spec(a.keywords[k], b.keywords[k]) for k in a.keywords)
        )
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(
            _same_spec(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_spec(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_spec(a[k], b[k]) for k in a)
    return a == b


def test_transformer_engine_spec_needs_te():
    from flexsp_patches.layer_specs import get_stock_layer_spec, have_te

    with pytest.raises(ValueError, match="transformer_impl"):
        get_stock_layer_spec("cuda")
    if have_te():
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(RuntimeError, match="Transformer Engine"):
        get_stock_layer_spec("transformer_engine")
