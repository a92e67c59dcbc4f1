"""Cost model JSON: load/save round trip, a clear message naming the bad field, builder, presets."""

import copy
import json

import pytest

from megatron.flexsp.planner.costmodel import CostModel, CostModelError, alltoall_bytes_per_token, build_cost_model
from megatron.flexsp.planner.presets import PRESET_NAMES, load_cost_model, preset

DESIGN_EXAMPLE = {
    "name": "free text",
    "num_layers": 32,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_query_groups": 8,
    "gpus_per_node": 8,
    "compute": {"alpha1_ms_per_token2": 5.1e-6, "alpha2_ms_per_token": 0.18, "beta1_ms": 630.0},
    "alltoall": {
        "bytes_per_token": 2097152,
        "bandwidth_gbs": {"2": 119.5, "4": 104.1, "8": 96.5, "16": 10.3, "32": 5.9, "64": 4.9},
    },
    "memory": {"limit_gb": 30, "model_states_mb": 1823.0, "activation_mb_per_token": 4.48},
}


def test_round_trip_file_and_formulas(tmp_path):
    d = copy.deepcopy(DESIGN_EXAMPLE)
    d["profiled_on"] = "cluster-a"  # unknown keys survive a round trip
    cm = CostModel.from_dict(d)
    path = tmp_path / "cm.json"
    cm.save(path)
    back = load_cost_model(str(path))
    assert back == cm and json.loads(path.read_text()) == json.loads(json.dumps(d))
    # formulas of DESIGN.md, computed by hand for a group of degree 4 holding 1000 and 3000 tokens
    comp = (5.1e-6 * 1000**2 + 0.18 * 1000 + 5.1e-6 * 3000**2 + 0.18 * 3000) / 4 + 630.0
    a2a = 2097152 * 4000 / 4 / 2**20 / 104.1
    assert cm.group_time_ms([1000, 3000], 4) == pytest.approx(comp + a2a, rel=1e-12)
    assert cm.alltoall_ms(4000, 1) == 0.0
    assert cm.memory_mb(4000, 4) == pytest.approx(1823.0 + 4.48 * 1000)
    assert cm.tokens_per_gpu == int((30 * 1024 - 1823.0) // 4.48)
    assert cm.capacity(8) == 8 * cm.tokens_per_gpu
    assert cm.fits(cm.capacity(2), 2) and not cm.fits(cm.capacity(2) + 1, 2)


def _bad(path, value):
    d = copy.deepcopy(DESIGN_EXAMPLE)
    keys = path.split(".")
    tgt = d
    for k in keys[:-1]:
        tgt = tgt[k]
    if value is KeyError:
        del tgt[keys[-1]]
    else:
        tgt[keys[-1]] = value
    return d


@pytest.mark.parametrize(
    "path,value,match",
    [
        ("num_layers", KeyError, r"missing field 'num_layers'"),
        ("hidden_size", 0, r"'hidden_size' must be a positive integer, got 0"),
        ("gpus_per_node", 2.5, r"'gpus_per_node' must be a positive integer"),
        ("num_attention_heads", True, r"'num_attention_heads' must be a positive integer"),
        ("num_query_groups", 5, r"'num_attention_heads' \(32\) must be a multiple of 'num_query_groups' \(5\)"),
        ("compute", KeyError, r"section 'compute'"),
        ("memory", [1, 2], r"section 'memory'"),
        ("compute.alpha1_ms_per_token2", KeyError, r"missing field 'compute.alpha1_ms_per_token2'"),
        ("compute.alpha2_ms_per_token", "fast", r"'compute.alpha2_ms_per_token' must be a finite number, got 'fast'"),
        ("compute.beta1_ms", -1.0, r"'compute.beta1_ms' must be >= 0, got -1.0"),
        ("compute.beta1_ms", float("nan"), r"'compute.beta1_ms' must be a finite number"),
        ("alltoall.bytes_per_token", None, r"'alltoall.bytes_per_token' must be a finite number, got None"),
        ("alltoall.bandwidth_gbs", {}, r"'alltoall.bandwidth_gbs' must be a non-empty object"),
        ("alltoall.bandwidth_gbs.8", 0, r"'alltoall.bandwidth_gbs.8' must be > 0, got 0"),
        ("alltoall.bandwidth_gbs.x", 1.0, r"'alltoall.bandwidth_gbs' key 'x' is not an integer degree"),
        ("alltoall.bandwidth_gbs.1", 1.0, r"'alltoall.bandwidth_gbs' key '1': degrees start at 2"),
        ("memory.limit_gb", 0, r"'memory.limit_gb' must be > 0, got 0"),
        ("memory.activation_mb_per_token", 0.0, r"'memory.activation_mb_per_token' must be > 0"),
        (
            "memory.model_states_mb",
            40000.0,
            r"'memory.model_states_mb' \(40000.0\) leaves no room under 'memory.limit_gb'",
        ),
    ],
)
def test_each_bad_field_is_named(path, value, match):
    with pytest.raises(CostModelError, match=match):
        CostModel.from_dict(_bad(path, value))


def test_not_an_object_and_bad_files(tmp_path):
    with pytest.raises(CostModelError, match="expected a JSON object, got list"):
        CostModel.from_dict([1, 2])
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(CostModelError, match="is not valid JSON"):
        load_cost_model(p)
    with pytest.raises(CostModelError, match="cost model file not found"):
        load_cost_model(tmp_path / "missing.json")
    with pytest.raises(CostModelError, match=r"unknown cost-model preset 'gpt-9b' \(presets: gpt-7b"):
        load_cost_model("gpt-9b")
    with pytest.raises(CostModelError, match="is a directory"):
        load_cost_model(tmp_path)


def test_num_query_groups_defaults_to_heads():
    d = _bad("num_query_groups", KeyError)
    assert CostModel.from_dict(d).num_query_groups == 32


def test_builder_bytes_per_token_mha_and_gqa():
    # MHA in bf16: 4 tensors (q, k, v, out) x 2 passes x layers x hidden x 2 bytes
    assert alltoall_bytes_per_token(32, 4096, 32) == 4 * 2 * 32 * 4096 * 2
    assert alltoall_bytes_per_token(32, 4096, 32, 32) == 4 * 2 * 32 * 4096 * 2
    # GQA with 8 of 32 groups: k and v carry a quarter of hidden each
    gqa = alltoall_bytes_per_token(32, 4096, 32, 8)
    assert gqa == 2 * 32 * (4096 + 4096 + 2 * 4096 / 4) * 2
    assert gqa < alltoall_bytes_per_token(32, 4096, 32)
    model = dict(name="m", num_layers=4, hidden_size=256, num_attention_heads=8, gpus_per_node=4)
    fit = dict(
        alpha1_ms_per_token2=1e-6, alpha2_ms_per_token=0.01, beta1_ms=3.0, limit_gb=8.0, activation_mb_per_token=0.5
    )
    cm = build_cost_model(
        **model, **fit, num_query_groups=2, bandwidth_gbs={2: 50.0, 4: 40.0}, num_parameters=1e9, world_size=8
    )
    assert cm.alltoall.bytes_per_token == 2 * 4 * (256 + 256 + 2 * 256 * 2 / 8) * 2
    assert cm.memory.model_states_mb == pytest.approx(1e9 * 16 / 8 / 2**20)  # ZeRO-3: 16 bytes/param over ranks
    assert cm.num_query_groups == 2
    with pytest.raises(CostModelError, match="model_states_mb, or num_parameters and world_size"):
        build_cost_model(**model, **fit, bandwidth_gbs={2: 1.0})  # neither model_states_mb nor num_parameters


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_by_name_load_and_round_trip(name, tmp_path):
    cm = load_cost_model(name, 64)
    assert cm == preset(name.upper(), 64)
    p = tmp_path / "p.json"
    cm.save(p)
    assert load_cost_model(p) == cm


def test_paper_preset_values():
    cm = preset("gpt-7b", 64)
    assert (cm.num_layers, cm.hidden_size, cm.num_attention_heads, cm.gpus_per_node) == (32, 4096, 64, 8)
    assert (cm.compute.alpha1_ms_per_token2, cm.compute.alpha2_ms_per_token, cm.compute.beta1_ms) == (
        5.128e-6,
        0.18396,
        629.36,
    )
    assert cm.memory.limit_gb == 30 and cm.memory.activation_mb_per_token == 4.48
    assert cm.memory.model_states_mb == pytest.approx(7e9 * 16 / 64 / 2**20)
    assert cm.alltoall.bytes_per_token == 4 * 2 * 32 * 4096 * 2
    assert dict(cm.alltoall.bandwidth_gbs) == {2: 119.54, 4: 104.07, 8: 96.5, 16: 10.33, 32: 5.94, 64: 4.87}
    assert preset("gpt-13b").compute.beta1_ms == 1132.56 and preset("gpt-30b").hidden_size == 6656
    # more ranks shard ZeRO-3 states thinner
    assert preset("gpt-7b", 128).memory.model_states_mb == pytest.approx(cm.memory.model_states_mb / 2)


def test_derived_degrees_and_world_size():
    cm = preset("gpt-7b", 64)
    assert cm.allowed_degrees(64) == [1, 2, 4, 8, 16, 32, 64]
    assert cm.allowed_degrees(12) == [1, 2, 4, 8]
    cap = cm.tokens_per_gpu
    assert cm.smallest_degree(cap, 64) == 1 and cm.smallest_degree(cap + 1, 64) == 2
    assert cm.smallest_degree(20 * cap, 64) == 32 and cm.smallest_degree(64 * cap, 64) == 64
    assert cm.smallest_degree(64 * cap + 1, 64) is None
    tiny = preset("cpu-tiny")
    assert tiny.allowed_degrees(4) == [1, 2, 4] and tiny.allowed_degrees(2) == [1, 2]
    with pytest.raises(CostModelError, match="world size 12 is not a multiple of gpus_per_node 8"):
        cm.check_world_size(12)
    with pytest.raises(CostModelError, match="world size must be positive"):
        cm.check_world_size(0)
    with pytest.raises(CostModelError, match="no all-to-all bandwidth for degree 3"):
        cm.bandwidth(3)
