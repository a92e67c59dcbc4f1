"""megatron.core dist_checkpointing interop (issue 18 item 4): a GPTModel checkpoint written by
``dist_checkpointing.save(model.sharded_state_dict(), dir)`` loads into FlexSP's model, and FlexSP
writes one that the stock ``dist_checkpointing.load`` reads back, on CPU / gloo.

References: megatron's stock layer spec (``flexsp_attention=False``) saving and loading through
megatron's own API, and the raw torch.distributed.checkpoint files read by torch's own
``dcp_to_torch_save`` (megatron's sharded keys: layers stacked on a leading axis). On a CPU-only
torch megatron's default torch_dist *writer* needs CUDA (see ``convert/mcore.py``), so saves here go
through ``SyncTorchDistSaveStrategy``, megatron's translation with torch's synchronous writer.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed

_SHAPE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2"]
_SHAPE += ["--group-query-attention", "--ffn-hidden-size", "48", "--swiglu", "--seq-length", "32"]
_SHAPE += ["--vocab-size", "300", "--make-vocab-size-divisible-by", "1"]  # at least the byte tokenizer's 258
VARIANTS = {
    "llama_like": [*_SHAPE, "--untie-embeddings-and-output-weights", "--use-rope-scaling", "--rotary-base", "500000"],
    "qwen_like": [*_SHAPE, "--add-qkv-bias", "--norm-epsilon", "1e-6"],  # tied output layer
}


def _cfg(flags, seed):
    from megatron.flexsp.convert.mcore import _model_config

    cfg, _ = _model_config(flags)
    cfg.seed = seed
    return cfg


def _tensors(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _same(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _stock_save(model, path):
    from megatron.core import dist_checkpointing

    from megatron.flexsp.convert.mcore import SyncTorchDistSaveStrategy

    path.mkdir(parents=True, exist_ok=True)  # dist_checkpointing.save wants an existing empty directory
    dist_checkpointing.save(model.sharded_state_dict(), str(path), sharded_strategy=SyncTorchDistSaveStrategy())


def _stock_load(model, path):
    from megatron.core import dist_checkpointing

    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(path)), strict=False)


def _raw_dcp(path, tmp):
    """The checkpoint's tensors by sharded key, read by torch alone (no megatron)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(path), str(tmp / "raw.pt"))
    return torch.load(tmp / "raw.pt", weights_only=False)


def _api_body(rank, world_size, tmp):
    from pathlib import Path

    from flexsp_patches import cpu_compat
    from megatron.flexsp.convert.errors import ConvertError
    from megatron.flexsp.convert.mcore import load_mcore_into, save_mcore
    from megatron.flexsp.runtime.model import build_gpt_model

    cpu_compat.init_model_parallel(seed=1, device_type="cpu")
    tmp, out = Path(tmp), {}
    for name, flags in VARIANTS.items():
        d = tmp / name
        d.mkdir()
        # megatron's stock GPTModel -> dist checkpoint -> FlexSP's model (other seed: every weight must move)
        stock = build_gpt_model(_cfg(flags, 3), flexsp_attention=False)
        _stock_save(stock, d / "from_stock")
        ours = build_gpt_model(_cfg(flags, 4))
        before = _tensors(ours)
        load_mcore_into(ours, d / "from_stock")
        raw = _raw_dcp(d / "from_stock", d)
        # FlexSP's model -> dist checkpoint -> megatron's stock GPTModel
        ours2 = build_gpt_model(_cfg(flags, 5))
        save_mcore(ours2, d / "from_flexsp")
        stock2 = build_gpt_model(_cfg(flags, 6), flexsp_attention=False)
        _stock_load(stock2, d / "from_flexsp")
        out[name] = dict(
            stock=_tensors(stock),
            ours_before=before,
            ours=_tensors(ours),
            ours2=_tensors(ours2),
            stock2=_tensors(stock2),
            raw_keys=sorted(k for k, v in raw.items() if isinstance(v, torch.Tensor)),
            raw_qkv=raw["decoder.layers.self_attention.linear_qkv.weight"],
            raw_norm=raw["decoder.layers.self_attention.linear_qkv.layer_norm_weight"],
        )
    # a Megatron-LM --save directory: the iteration latest_checkpointed_iteration.txt names
    lm = tmp / "megatron_lm_save"
    (lm / "iter_0000007").mkdir(parents=True)
    (lm / "latest_checkpointed_iteration.txt").write_text("7\n")
    stock = build_gpt_model(_cfg(VARIANTS["llama_like"], 8), flexsp_attention=False)
    _stock_save(stock, lm / "iter_0000007")
    ours = build_gpt_model(_cfg(VARIANTS["llama_like"], 9))
    load_mcore_into(ours, lm)
    out["megatron_lm_dir"] = _same(_tensors(ours), _tensors(stock))
    # a bf16 model's checkpoint (Megatron-LM --bf16 saves the model's bf16 weights) fills the fp32 model
    stock = build_gpt_model(_cfg(VARIANTS["llama_like"], 11), flexsp_attention=False).bfloat16()
    _stock_save(stock, tmp / "bf16")
    load_mcore_into(ours, tmp / "bf16")
    bf, got = _tensors(stock), _tensors(ours)
    out["bf16"] = sorted(bf) == sorted(got) and all(
        got[k].dtype == torch.float32 and torch.equal(bf[k].float(), got[k]) for k in bf
    )
    # Megatron-LM's default (no --disable-bias-linear) has linear biases, which FlexSP's layers lack
    biased_cfg = _cfg(VARIANTS["llama_like"], 12)
    biased_cfg.add_bias_linear = True
    _stock_save(build_gpt_model(biased_cfg, flexsp_attention=False), tmp / "biased")
    errors = []
    deeper = build_gpt_model(_cfg([*VARIANTS["llama_like"], "--num-layers", "3"], 1))
    bias = build_gpt_model(_cfg(VARIANTS["qwen_like"][:-2] + ["--untie-embeddings-and-output-weights"], 1))
    cases = [(deeper, lm), (bias, tmp / "llama_like" / "from_stock"), (ours, tmp / "nowhere"), (ours, tmp / "biased")]
    for model, path in cases:
        try:
            load_mcore_into(model, path)
            errors.append(None)
        except ConvertError as e:
            errors.append(str(e))
    out["errors"] = errors
    return out


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    (r,) = run_distributed(_api_body, 1, str(tmp_path_factory.mktemp("mcore")), timeout=180)
    return r


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_stock_dist_checkpoint_loads_into_flexsp_model(api, name):
    r = api[name]
    assert _same(r["ours"], r["stock"])  # every weight, bit for bit
    # the load moved every weight but the norms and biases (ones, zeros in both initialisations)
    unchanged = [k for k in r["stock"] if torch.equal(r["ours_before"][k], r["stock"][k])]
    assert all("layernorm" in k or k.endswith("bias") or r["stock"][k].numel() == 0 for k in unchanged), unchanged
    assert len(r["stock"]) - len(unchanged) >= 9
    assert ("output_layer.weight" in r["stock"]) == (name == "llama_like")
    assert any(k.endswith("linear_qkv.bias") for k in r["stock"]) == (name == "qwen_like")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_flexsp_dist_checkpoint_loads_into_stock_model(api, name):
    assert _same(api[name]["stock2"], api[name]["ours2"])


def test_the_files_are_megatrons_sharded_layout(api):
    """torch alone reads the checkpoint: megatron's sharded keys, layers stacked along the first axis,
    the local spec's input norm under its Transformer Engine name."""
    r = api["llama_like"]
    assert "decoder.layers.self_attention.linear_qkv.weight" in r["raw_keys"]
    assert not any(k.startswith("decoder.layers.0.") for k in r["raw_keys"])
    for i in range(2):
        assert torch.equal(r["raw_qkv"][i], r["stock"][f"decoder.layers.{i}.self_attention.linear_qkv.weight"])
        assert torch.equal(r["raw_norm"][i], r["stock"][f"decoder.layers.{i}.input_layernorm.weight"])


def test_megatron_lm_save_dir_bf16_and_errors(api):
    assert api["megatron_lm_dir"] and api["bf16"]
    deeper, bias, missing, biased = api["errors"]
    assert biased and "holds decoder.layers.mlp.linear_fc1.bias, which this model lacks" in biased, biased
    assert deeper and "does not fit this model" in deeper
    assert bias and bias.endswith(
        "does not fit this model: decoder.layers.self_attention.linear_qkv.bias is not in the checkpoint"
    )
    assert missing and "no such directory" in missing


# ----------------------------------------------------------------------------- flexsp-convert commands
def _cli_body(rank, world_size, tmp):
    import contextlib
    import io
    from pathlib import Path

    from flexsp_patches import cpu_compat
    from megatron.flexsp.convert import cli
    from megatron.flexsp.runtime.model import build_gpt_model
    from megatron.flexsp.training.checkpointing import read_model_state

    cpu_compat.init_model_parallel(seed=1, device_type="cpu")
    tmp = Path(tmp)
    flags = VARIANTS["qwen_like"]
    stock = build_gpt_model(_cfg(flags, 3), flexsp_attention=False)
    _stock_save(stock, tmp / "mcore")
    rc = cli.main(["mcore-to-flexsp", "--mcore", str(tmp / "mcore"), "--out", str(tmp / "ckpt"), "--", *flags])
    state, meta = read_model_state(tmp / "ckpt")
    # back to megatron.core, the model flags read from the FlexSP checkpoint's own record
    rc2 = cli.main(["flexsp-to-mcore", "--ckpt", str(tmp / "ckpt"), "--out", str(tmp / "mcore2")])
    stock2 = build_gpt_model(_cfg(flags, 7), flexsp_attention=False)
    _stock_load(stock2, tmp / "mcore2")
    bad = [*flags, "--num-layers", "3"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc3 = cli.main(["mcore-to-flexsp", "--mcore", str(tmp / "mcore"), "--out", str(tmp / "bad"), "--", *bad])
        rc4 = cli.main(
            ["mcore-to-flexsp", "--mcore", str(tmp / "mcore"), "--out", str(tmp / "bad2"), "--", "--hidden-size", "x"]
        )
    # a Megatron-LM checkpoint records its args in common.pt: no model flags needed
    from argparse import Namespace

    from megatron.core import dist_checkpointing

    from megatron.flexsp.convert.mcore import SyncTorchDistSaveStrategy

    lm_args = dict(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2)
    lm_args.update(group_query_attention=True, swiglu=True, normalization="RMSNorm", position_embedding_type="rope")
    lm_args.update(max_position_embeddings=32, seq_length=32, rotary_base=10000, norm_epsilon=1e-6)
    lm_args.update(add_qkv_bias=True, untie_embeddings_and_output_weights=False, use_rope_scaling=False)
    lm_args.update(padded_vocab_size=300, add_bias_linear=False, num_experts=None, kv_channels=8, rotary_percent=1.0)
    rcs_lm = []
    for name, more in (("lm", {}), ("moe", {"num_experts": 8})):
        (tmp / name).mkdir()
        common = {"args": Namespace(**{**lm_args, **more}), "iteration": 100}
        sd = {**stock.sharded_state_dict(), **common}
        dist_checkpointing.save(sd, str(tmp / name), sharded_strategy=SyncTorchDistSaveStrategy())
        with contextlib.redirect_stderr(err):
            rcs_lm.append(cli.main(["mcore-to-flexsp", "--mcore", str(tmp / name), "--out", str(tmp / f"{name}_ck")]))
    lm_state, _ = read_model_state(tmp / "lm_ck")
    return dict(
        rcs=(rc, rc2, rc3, rc4, *rcs_lm),
        lm_state=lm_state,
        stock=_tensors(stock),
        state=state,
        iteration=meta.get("iteration"),
        stock2=_tensors(stock2),
        bad_written=(tmp / "bad").exists() or (tmp / "bad2").exists(),
        err=err.getvalue(),
    )


@pytest.mark.slow  # one gloo process, ~10 s on 2 cores
def test_convert_commands_round_trip(tmp_path):
    (r,) = run_distributed(_cli_body, 1, str(tmp_path), timeout=180)
    assert r["rcs"] == (0, 0, 2, 2, 0, 2)
    assert _same(r["state"], r["stock"]) and r["iteration"] == 0
    assert _same(r["lm_state"], r["stock"])  # model flags from the Megatron-LM args of common.pt
    assert _same(r["stock2"], r["stock"])
    assert not r["bad_written"]
    err = r["err"].strip().splitlines()
    assert len(err) == 3 and "does not fit this model" in err[0] and "--hidden-size" in err[1], err
    assert "Megatron-LM args num_experts=8; FlexSP's GPT cannot build it" in err[2]


# ------------------------------------------------------------- a tensor-parallel checkpoint, read whole
def _tp_body(rank, world_size, tmp):
    from pathlib import Path

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from flexsp_patches import cpu_compat
    from megatron.flexsp.convert.mcore import load_mcore_into
    from megatron.flexsp.runtime.model import build_gpt_model

    cpu_compat.apply(force_cpu=True)
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    cpu_compat._seed_cpu_tracker(3)
    flags = VARIANTS["llama_like"]
    cfg = _cfg(flags, 3)
    cfg.tensor_model_parallel_size = 2
    tp = build_gpt_model(cfg, flexsp_attention=False)  # megatron's stock model, every linear split over 2 ranks
    ids = torch.tensor([[5, 17, 3, 250, 9, 42, 7, 7, 1, 299]])
    with torch.no_grad():
        local = tp(ids, torch.arange(10)[None], None).contiguous()  # this rank's half of the vocabulary
    parts = [torch.empty_like(local) for _ in range(2)]
    dist.all_gather(parts, local, group=ps.get_tensor_model_parallel_group())
    _stock_save(tp, Path(tmp) / "tp2")
    halves = tuple(tp.state_dict()["decoder.layers.0.self_attention.linear_qkv.weight"].shape)
    ps.destroy_model_parallel()
    # the same checkpoint, whole, in FlexSP's model (tp = 1), then run by megatron's stock tp = 1 model
    cpu_compat.init_model_parallel(seed=1, device_type="cpu")
    ours = build_gpt_model(_cfg(flags, 9))
    load_mcore_into(ours, Path(tmp) / "tp2")
    whole = build_gpt_model(_cfg(flags, 10), flexsp_attention=False)
    whole.load_state_dict(ours.state_dict())
    with torch.no_grad():
        logits = whole(ids, torch.arange(10)[None], None)
    full = tuple(ours.state_dict()["decoder.layers.0.self_attention.linear_qkv.weight"].shape)
    return dict(tp_logits=torch.cat(parts, dim=-1), logits=logits, halves=halves, full=full)


@pytest.mark.slow  # 2 gloo ranks, ~15 s on 2 cores
def test_tensor_parallel_checkpoint_loads_whole(tmp_path):
    """A checkpoint of a tensor-parallel (TP = 2) megatron GPTModel, written on 2 gloo ranks, loads into
    FlexSP's single model, which then computes the TP model's logits."""
    r = run_distributed(_tp_body, 2, str(tmp_path), timeout=240)
    assert r[0]["halves"] == (32, 32) and r[0]["full"] == (64, 32)  # each rank held half the q/k/v rows
    assert torch.allclose(r[0]["logits"], r[0]["tp_logits"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(r[1]["logits"], r[0]["logits"])
