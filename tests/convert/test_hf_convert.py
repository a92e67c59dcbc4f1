"""flexsp-convert against transformers itself: tiny Llama (GQA, untied, Llama 3.1 RoPE scaling,
padded vocabulary) and Qwen2 (q/k/v biases, tied) models built here, imported, run by the product
on packed batches (one rank, and 4 gloo ranks under heterogeneous FlexSP SP groups), exported back.

The reference is transformers' own forward of each document alone (no packing, positions 0..L-1),
so the mapping (per-group QKV layout, [gate; up], norms, biases, tied head, RoPE base and scaling,
epsilon) is checked by what the model computes, not by re-deriving names.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from megatron.flexsp.planner.plan import Group, MicroBatch, Plan
from tests.convert import hf_models
from tests.dist_utils import run_distributed

POOL = [(0,), (1,), (2,), (3,), (0, 1), (2, 3), (0, 1, 2, 3)]
LENGTHS = [9, 14, 6, 11, 24, 5, 3]
REL_TOL = 1e-4
KINDS = ("llama", "qwen2", "mistral")
# every document packed in one row on one rank (positions restart at each document)
ONE_RANK_PLAN = Plan(1, LENGTHS, [MicroBatch([Group([0], list(range(len(LENGTHS))))])])


def _cli(argv: list[str]) -> tuple[int, str]:
    from megatron.flexsp.convert.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return rc, buf.getvalue()


def _convert_body(rank, world_size, jobs, forward_args):
    """Run CLI commands in one process (a world of one: the converter reuses its process group),
    then the one-rank forward of the converted models (one process start for both)."""
    rcs = [_cli(argv) for argv in jobs]
    return rcs, _forward_body(rank, world_size, *forward_args)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both tiny models saved by transformers, imported (hf-to-flexsp) and exported back (flexsp-to-hf)."""
    root = tmp_path_factory.mktemp("hfconv")
    out: dict = {}
    jobs = []
    for kind in KINDS:
        model = hf_models.build(kind)
        hf_dir = hf_models.save(model, root / f"{kind}_hf")
        (hf_dir / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')  # copied by --tokenizer
        ckpt, back = root / f"{kind}_ckpt", root / f"{kind}_back"
        jobs += [
            ["hf-to-flexsp", "--hf", str(hf_dir), "--out", str(ckpt)],
            ["flexsp-to-hf", "--ckpt", str(ckpt), "--out", str(back), "--tokenizer", str(hf_dir)],
        ]
        out[kind] = dict(model=model, hf=hf_dir, ckpt=ckpt, back=back)
    # the Llama saved in shards (model.safetensors.index.json) converts to the same checkpoint
    sharded = hf_models.save(out["llama"]["model"], root / "llama_sharded", max_shard_size="20KB")
    jobs.append(["hf-to-flexsp", "--hf", str(sharded), "--out", str(root / "llama_sharded_ckpt")])
    out["_sharded_ckpt"] = root / "llama_sharded_ckpt"
    # a bf16 checkpoint (as released models are) comes back in bf16 without --dtype, bit for bit
    bf16 = hf_models.save(hf_models.build("qwen2", seed=5).to(torch.bfloat16), root / "qwen2_bf16")
    jobs += [
        ["hf-to-flexsp", "--hf", str(bf16), "--out", str(root / "bf16_ckpt")],
        ["flexsp-to-hf", "--ckpt", str(root / "bf16_ckpt"), "--out", str(root / "bf16_back")],
    ]
    out["_bf16"] = (bf16, root / "bf16_back")
    cases = {k: (str(c["hf"]), str(c["ckpt"])) for k, c in _models(out).items()}
    results, forward = run_distributed(
        _convert_body, 1, jobs, (cases, ONE_RANK_PLAN, _docs(_models(out))), timeout=300
    )[0]
    for i, kind in enumerate(KINDS):
        (rc_in, printed), (rc_out, _) = results[2 * i], results[2 * i + 1]
        assert rc_in == 0 and rc_out == 0, (kind, results)
        out[kind]["printed"] = printed
    assert [r[0] for r in results[2 * len(KINDS) :]] == [0, 0, 0], results
    out["_one_rank_forward"] = [forward]
    return out


def test_sharded_and_single_file_give_the_same_checkpoint(converted):
    from megatron.flexsp.training.checkpointing import read_model_state

    assert len(list((converted["llama"]["hf"]).parent.glob("llama_sharded/model-*.safetensors"))) > 1
    single, _ = read_model_state(converted["llama"]["ckpt"])
    sharded, _ = read_model_state(converted["_sharded_ckpt"])
    assert single.keys() == sharded.keys() and all(torch.equal(single[k], sharded[k]) for k in single)


def test_bf16_model_exports_in_bf16_bit_for_bit(converted):
    from safetensors.torch import load_file

    src, back = converted["_bf16"]
    a, b = load_file(str(src / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys() and all(t.dtype == torch.bfloat16 for t in b.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == "bfloat16"


def _docs(models):
    return {k: hf_models.documents(c["model"].config.vocab_size, LENGTHS) for k, c in models.items()}


def _models(converted):
    return {k: v for k, v in converted.items() if not k.startswith("_")}


def test_import_prints_matching_trainer_flags(converted):
    llama = converted["llama"]["printed"]
    assert "--finetune" in llama and "--load" in llama
    for flag in (
        "--num-layers 2",
        "--hidden-size 32",
        "--ffn-hidden-size 48",
        "--num-attention-heads 4",
        "--group-query-attention --num-query-groups 2",
        "--rotary-base 500000",
        "--use-rope-scaling --rope-scaling-factor 8.0",
        "--norm-epsilon 1e-05",
        "--vocab-size 96 --make-vocab-size-divisible-by 128",
        "--untie-embeddings-and-output-weights",
        "--swiglu",
        "--normalization RMSNorm",
    ):
        assert flag in llama, (flag, llama)
    assert "--add-qkv-bias" not in llama
    qwen = converted["qwen2"]["printed"]
    for flag in ("--add-qkv-bias", "--norm-epsilon 1e-06", "--rotary-base 1000000", "--ffn-hidden-size 40"):
        assert flag in qwen, (flag, qwen)
    assert "--untie-embeddings-and-output-weights" not in qwen and "--use-rope-scaling" not in qwen


def test_round_trip_is_bit_exact_and_loads_in_transformers(converted):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    for kind, c in _models(converted).items():
        before = c["model"].state_dict()
        after = load_file(str(c["back"] / "model.safetensors"))
        # transformers keeps a tied lm_head in its state dict; the file holds each tensor once.
        expect = {k: v for k, v in before.items() if not (kind == "qwen2" and k == "lm_head.weight")}
        assert after.keys() == expect.keys(), (kind, sorted(set(after) ^ set(expect)))
        for name, t in expect.items():
            assert after[name].dtype == t.dtype and torch.equal(after[name], t), (kind, name)
        assert (c["back"] / "tokenizer_config.json").read_text() == (c["hf"] / "tokenizer_config.json").read_text()
        loaded, info = AutoModelForCausalLM.from_pretrained(str(c["back"]), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (kind, info)
        assert type(loaded) is type(c["model"])
        docs = hf_models.documents(c["model"].config.vocab_size, [12, 5])
        for a, b in zip(hf_models.hf_logits(loaded.eval(), docs), hf_models.hf_logits(c["model"], docs)):
            assert torch.equal(a, b), kind  # same weights, same config -> the same computation
        cfg_a = json.loads((c["back"] / "config.json").read_text())
        assert cfg_a["tie_word_embeddings"] == (kind == "qwen2")


def _forward_body(rank, world_size, cases, plan, docs):
    """Each case's (model name -> its documents) product logits for this rank's slices of ``plan`` (FlexSP attention, SP groups)."""
    import json as _json

    from flexsp_patches import cpu_compat
    from megatron.flexsp.convert.hf_config import model_from_hf_config
    from megatron.flexsp.runtime.group_pool import GroupPool
    from megatron.flexsp.runtime.model import build_gpt_model
    from megatron.flexsp.runtime.packing import pack_group
    from megatron.flexsp.runtime.sp_group import packed_seq_params, sp_group
    from megatron.flexsp.training.checkpointing import read_model_state

    cpu_compat.init_model_parallel(seed=1, device_type="cpu")
    pool = GroupPool([g for g in POOL if max(g) < world_size])
    out = {}
    for name, (hf_dir, ckpt) in cases.items():
        m = model_from_hf_config(_json.loads((Path(hf_dir) / "config.json").read_text()))
        state, meta = read_model_state(ckpt)
        model = build_gpt_model(m.gpt_config(padded_vocab_size=meta["args"]["padded_vocab_size"])).eval()
        res = model.load_state_dict(state, strict=False)
        assert not res.unexpected_keys and all(k.endswith("_extra_state") for k in res.missing_keys), res
        slices = []
        with torch.no_grad():
            for mi, mb in enumerate(plan.micro_batches):
                g = mb.group_of(rank)
                with sp_group(pool, g.ranks) as active:
                    sl = pack_group([docs[name][i] for i in g.sequences], active.rank, active.world_size)
                    logits = model(sl.input_ids, sl.position_ids, None, packed_seq_params=packed_seq_params(sl, active))
                slices.append((mi, tuple(g.ranks), active.rank, logits[0].clone()))
        out[name] = slices
    return out


def _assemble(results, name, plan):
    """Document index -> its logits [L, padded vocab], from every rank's slices."""
    docs = {}
    for mi, mb in enumerate(plan.micro_batches):
        for g in mb.groups:
            parts = sorted(
                (r_in, lg)
                for res in results
                for (m, ranks, r_in, lg) in res[name]
                if (m, ranks) == (mi, tuple(g.ranks))
            )
            assert [p[0] for p in parts] == list(range(g.degree))
            full = torch.cat([p[1] for p in parts])
            off = 0
            for i in g.sequences:
                docs[i] = full[off : off + plan.lengths[i]]
                off += plan.lengths[i]
    return docs


def _check_logits(converted, results, plan, docs_by_kind):
    for kind, c in converted.items():
        vocab = c["model"].config.vocab_size
        got = _assemble(results, kind, plan)
        ref = hf_models.hf_logits(c["model"], docs_by_kind[kind])
        assert sorted(got) == list(range(len(ref)))
        for i, r in enumerate(ref):
            g = got[i]
            err = float((g[:, :vocab] - r).abs().max()) / float(r.abs().max())
            assert err <= REL_TOL, (kind, i, err)
            assert torch.all(g[:, vocab:] == 0), kind  # padded rows of the output table are zero
        assert float(ref[0].abs().max()) > 1.0  # the logits are not trivially small


def test_logits_equal_transformers_on_a_packed_batch_one_rank(converted):
    models = _models(converted)
    _check_per_kind(models, converted["_one_rank_forward"], ONE_RANK_PLAN, _docs(models))


def _check_per_kind(converted, results, plan, docs):
    for kind in converted:
        _check_logits({kind: converted[kind]}, results, plan, {kind: docs[kind]})


@pytest.mark.slow  # 4 processes building both models: ~30 s on 2 shared cores
def test_logits_equal_transformers_under_flexsp_sp_groups_on_four_ranks(converted):
    plan = Plan(
        4,
        LENGTHS,
        [
            MicroBatch([Group([0, 1], [0, 1]), Group([2], [2]), Group([3], [3, 6])]),  # degrees 2, 1, 1
            MicroBatch([Group([0, 1, 2, 3], [4, 5])]),  # degree 4: one head per rank, kv heads replicated
        ],
    )
    models = _models(converted)
    cases = {k: (str(c["hf"]), str(c["ckpt"])) for k, c in models.items()}
    results = run_distributed(_forward_body, 4, cases, plan, _docs(models), timeout=300)
    _check_per_kind(models, results, plan, _docs(models))
