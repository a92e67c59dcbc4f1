"""The README's continued pre-training workflow on the tiny Llama, end to end: convert a Hugging Face
directory, train it with FlexSP on 2 gloo ranks (``pretrain_gpt_flexsp.py --load CKPT --finetune``
with the flags the converter printed), export the trained checkpoint, load it with transformers;
once at TP 1 (2 ranks as 2 SP units) and once at TP 2 (one unit: the one-file converted checkpoint
split over the TP group on load, the torch_dist checkpoint written as whole tensors).

Reference: transformers' loss of the exported model on a set of documents must equal the product's
evaluation loss (the FlexSP executor, forward only, under SP groups of degree 2 and 1) of the
trained checkpoint on the same documents, and training must have moved the weights.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.flexsp.planner.plan import Group, MicroBatch, Plan
from tests.convert import hf_models
from tests.dist_utils import run_distributed
from tests.torchrun_utils import kill_tree, torchrun

ROOT = Path(__file__).resolve().parents[2]
LENGTHS = [17, 9, 12, 6]
VOCAB = 384
PLAN = Plan(2, LENGTHS, [MicroBatch([Group([0, 1], [0, 1])]), MicroBatch([Group([0], [2]), Group([1], [3])])])


def _product_eval_body(rank, world_size, hf_config, save_dir, docs):
    """Evaluation loss of the trained checkpoint through the FlexSP executor (FSDP2, SP groups)."""
    import json

    from flexsp_patches import cpu_compat
    from megatron.flexsp.convert.hf_config import model_from_hf_config
    from megatron.flexsp.runtime.executor import FlexSPExecutor
    from megatron.flexsp.runtime.group_pool import GroupPool
    from megatron.flexsp.runtime.model import build_gpt_model
    from megatron.flexsp.runtime.sharding import shard_model
    from megatron.flexsp.training.checkpointing import read_model_state

    cpu_compat.init_model_parallel(seed=1, device_type="cpu")
    state, meta = read_model_state(save_dir)
    rows = state["embedding.word_embeddings.weight"].shape[0]
    model = build_gpt_model(model_from_hf_config(json.loads(hf_config)).gpt_config(padded_vocab_size=rows))
    res = model.load_state_dict(state, strict=False)
    assert not res.unexpected_keys and all(k.endswith("_extra_state") for k in res.missing_keys), res
    shard_model(model, "fsdp2")
    ex = FlexSPExecutor(model, GroupPool([(0,), (1,), (0, 1)]), sharding_mode="fsdp2")
    return ex.run(PLAN, docs, forward_only=True).loss, meta["iteration"]


def _run(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert p.returncode == 0, (cmd, p.stdout, p.stderr)
    return p.stdout


@pytest.mark.slow  # converts, trains 3 iterations under torchrun, exports: ~1-2 min on 2 cores
@pytest.mark.parametrize("tp", [1, 2])
def test_convert_finetune_export_loads_in_transformers_with_the_products_loss(tmp_path, tp):
    from transformers import AutoModelForCausalLM

    # vocabulary 384 = 3 x 128: the trainer's data (byte tokenizer, 258 ids) fits, and like the real models
    # (Llama 3 128256, Qwen2.5 152064, Mistral 32768 are multiples of 128) the table needs no padding, so
    # both losses take the softmax over the same ids.
    original = hf_models.build("llama", vocab_size=VOCAB)
    hf_dir = hf_models.save(original, tmp_path / "hf")
    ckpt, save, out = tmp_path / "ckpt", tmp_path / "save", tmp_path / "hf_out"
    convert = [sys.executable, "-m", "megatron.flexsp.convert"]
    printed = _run([*convert, "hf-to-flexsp", "--hf", str(hf_dir), "--out", str(ckpt)])
    line = next(x for x in printed.splitlines() if x.startswith("train it with:"))
    flags = shlex.split(line.split("--finetune", 1)[1])
    log = tmp_path / "train.log"
    proc = torchrun(
        [
            "--load", str(ckpt), "--finetune", *flags,
            "--mock-data", "--mock-data-min-len", "8", "--seq-length", "48",
            "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-2", "--lr-warmup-iters", "0",
            "--seed", "3", "--flexsp-time-limit", "1", "--no-progress-bar", "--save", str(save),
            "--tensor-model-parallel-size", str(tp),
        ],
        log,
        nproc=2,
    )  # fmt: skip
    try:
        rc = proc.wait(timeout=420)
    finally:
        kill_tree(proc.pid)
    assert rc == 0, log.read_text()[-4000:]
    _run([*convert, "flexsp-to-hf", "--ckpt", str(save), "--out", str(out), "--tokenizer", str(hf_dir)])

    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.eval()
    trained = model.state_dict()
    moved = max(float((trained[k] - v).abs().max()) for k, v in original.state_dict().items())
    # The export is the trained model (it moved), trained from the converted weights: 3 Adam steps of lr 1e-2
    # move a weight by about 3e-2 at most, while a fresh initialisation would differ by ~0.15 (hf_models).
    assert 1e-3 < moved < 5e-2, moved

    docs = hf_models.documents(VOCAB, LENGTHS, seed=11)
    with torch.no_grad():
        nll = sum(
            torch.nn.functional.cross_entropy(lg, d[1:], reduction="sum").double()
            for lg, d in zip(hf_models.hf_logits(model, docs), docs)
        )
    hf_loss = float(nll) / sum(LENGTHS)
    results = run_distributed(_product_eval_body, 2, (hf_dir / "config.json").read_text(), str(save), docs, timeout=240)
    (loss0, iteration), (loss1, _) = results
    assert iteration == 3 and loss0 == loss1
    assert abs(loss0 - hf_loss) <= 1e-5 * abs(hf_loss), (loss0, hf_loss)
