"""The plan validator rejects each kind of broken plan with a precise message; plan JSON round trip."""

import copy
import json

import pytest

from megatron.flexsp.planner.costmodel import build_cost_model
from megatron.flexsp.planner.plan import Group, MicroBatch, Plan, PlanError, SolverInfo, estimate_plan_ms, validate_plan
from tests.planner._p1_util import tiny_cost


@pytest.fixture
def cost():
    # 8 ranks, 4 per node; tokens per GPU = (1024 - 24) / 1.0 = 1000
    return tiny_cost(bandwidth_gbs={2: 1.0, 4: 0.5, 8: 0.1}, name="t")


def good_dict():
    return {
        "world_size": 8,
        "lengths": [3000, 700, 1500, 300, 650, 900, 410],
        "micro_batches": [
            {
                "groups": [
                    {"ranks": [0, 1, 2, 3], "sequences": [0, 3]},
                    {"ranks": [4, 5], "sequences": [2]},
                    {"ranks": [6], "sequences": [1]},
                    {"ranks": [7], "sequences": [4]},
                ]
            },
            {"groups": [{"ranks": [0, 1, 2, 3, 4, 5, 6, 7], "sequences": [5, 6]}]},
        ],
        "estimated_time_ms": None,
        "solver": {
            "method": "manual",
            "status": "hand-made",
            "solve_time_s": 0.0,
            "lower_bound_ms": None,
            "note": "kept",
        },
    }


def test_good_plan_validates_and_round_trips(cost, tmp_path):
    plan = Plan.from_dict(good_dict())
    validate_plan(plan, cost, world_size=8, num_sequences=7)
    plan.estimated_time_ms = estimate_plan_ms(plan, cost)

    # independent estimate: slowest group per micro-batch, by the DESIGN.md formulas
    def grp(ls, d):
        comp = sum(1e-4 * s * s + 0.01 * s for s in ls) / d + 2.0
        bw = {2: 1.0, 4: 0.5, 8: 0.1}
        a2a = 0 if d == 1 else cost.alltoall.bytes_per_token * sum(ls) / d / 2**20 / bw[d]
        return comp + a2a

    expect = max(grp([3000, 300], 4), grp([1500], 2), grp([700], 1), grp([650], 1)) + grp([900, 410], 8)
    assert plan.estimated_time_ms == pytest.approx(expect, rel=1e-12)
    path = tmp_path / "plan.json"
    plan.save(path)
    back = Plan.load(path)
    assert back.to_dict() == plan.to_dict()
    assert back.solver.extra == {"note": "kept"}
    assert Plan.from_json(plan.to_json()).to_dict() == plan.to_dict()
    assert json.loads(path.read_text())["lengths"] == good_dict()["lengths"]
    assert not list(tmp_path.glob("*.tmp"))
    assert back.micro_batches[0].group_of(5).ranks == [4, 5]
    assert back.degree_histogram() == {1: 2, 2: 1, 4: 1, 8: 1}


def _mutate(fn):
    d = good_dict()
    fn(d)
    return Plan.from_dict(d)


def _g(d, m, g):
    return d["micro_batches"][m]["groups"][g]


def _regroup(d, *groups):
    """Micro-batch 0 of ``d`` made of these (ranks, sequences) groups instead."""
    d["micro_batches"][0]["groups"] = [{"ranks": r, "sequences": s} for r, s in groups]


BROKEN = [
    (
        "rank outside",
        lambda d: _g(d, 0, 3)["ranks"].__setitem__(0, 8),
        r"micro-batch 0 group 3: rank 8 is outside 0..7",
    ),
    ("negative rank", lambda d: _g(d, 0, 3)["ranks"].__setitem__(0, -1), r"rank -1 is outside 0..7"),
    (
        "rank in two groups",
        lambda d: _g(d, 0, 3)["ranks"].__setitem__(0, 6),
        r"micro-batch 0: rank 6 is in group 2 and group 3",
    ),
    (
        "rank twice in a group",
        lambda d: _g(d, 1, 0)["ranks"].__setitem__(7, 6),
        r"micro-batch 1 group 0: rank 6 is listed twice",
    ),
    (
        "rank missing",
        lambda d: d["micro_batches"][0]["groups"].pop(3),
        r"micro-batch 0: groups do not partition the ranks; ranks \[7\] are in no group",
    ),
    (
        "group without rank",
        lambda d: d["micro_batches"][0]["groups"].append({"ranks": [], "sequences": []}),
        r"micro-batch 0 group 4 has no rank",
    ),
    ("micro-batch without group", lambda d: d["micro_batches"].append({"groups": []}), r"micro-batch 2 has no group"),
    ("no micro-batch", lambda d: d.__setitem__("micro_batches", []), r"plan has no micro-batch"),
    (
        "sequence twice",
        lambda d: _g(d, 1, 0)["sequences"].append(2),
        r"sequence 2 is assigned twice \(micro-batch 0 group 1 and micro-batch 1 group 0\)",
    ),
    (
        "sequence index outside",
        lambda d: _g(d, 0, 2)["sequences"].append(7),
        r"micro-batch 0 group 2: sequence index 7 is outside 0..6",
    ),
    ("sequence missing", lambda d: _g(d, 1, 0)["sequences"].remove(6), r"sequences \[6\] \(of 1\) are in no group"),
    (
        "empty group with enough sequences",
        lambda d: (_g(d, 0, 3)["sequences"].clear(), _g(d, 0, 2)["sequences"].append(4)),
        r"micro-batch 0: group 3 holds no sequence although the micro-batch has at least as many sequences as groups",
    ),
    (
        "zero length",
        lambda d: d["lengths"].__setitem__(3, 0),
        r"lengths\[3\] = 0: a sequence must have at least one token",
    ),
]


def test_empty_group_allowed_when_fewer_sequences_than_groups(cost):
    d = good_dict()
    d["lengths"] = [100, 200]
    d["micro_batches"] = [
        {"groups": [{"ranks": [0, 1, 2, 3], "sequences": [0]}, {"ranks": [4, 5, 6, 7], "sequences": [1]}]},
    ]
    validate_plan(Plan.from_dict(d), cost)
    d["micro_batches"] = [
        {
            "groups": [
                {"ranks": [0, 1, 2, 3], "sequences": [0, 1]},
                {"ranks": [4, 5], "sequences": []},
                {"ranks": [6, 7], "sequences": []},
            ]
        }
    ]
    validate_plan(Plan.from_dict(d), cost)  # 2 sequences < 3 groups: an idle group is unavoidable


COST_BREAKS = [
    (
        "degree not dividing heads",
        lambda d: _regroup(d, ([0, 1, 2], [0, 3]), ([3], [2]), ([4, 5, 6, 7], [1, 4])),
        r"micro-batch 0 group 0 \(degree 3, ranks \[0, 1, 2\]\): degree 3 does not divide num_attention_heads 8",
    ),
    (
        "group across nodes",
        lambda d: _regroup(d, ([2, 3, 4, 5], [0, 3]), ([0, 1], [2]), ([6], [1]), ([7], [4])),
        r"micro-batch 0 group 0 \(degree 4, ranks \[2, 3, 4, 5\]\): a group of degree <= gpus_per_node \(4\) must lie in one "
        r"node, spans nodes \[0, 1\]",
    ),
    (
        "memory",
        lambda d: d["lengths"].__setitem__(1, 1001),
        r"micro-batch 0 group 2 \(degree 1, ranks \[6\]\): 1001 tokens need 1025.0 MB per GPU, over the limit 1024.0 MB",
    ),
]


@pytest.mark.parametrize(
    "name,fn,match,structural",
    [(*b, True) for b in BROKEN] + [(*b, False) for b in COST_BREAKS],
    ids=[b[0] for b in BROKEN + COST_BREAKS],
)
def test_broken_plans_rejected(cost, name, fn, match, structural):
    """A structural break is rejected with or without the cost model; a cost-model break only with it."""
    plan = _mutate(fn)
    if structural:
        with pytest.raises(PlanError, match=match):
            validate_plan(plan)
    else:
        validate_plan(plan)  # structurally fine
    with pytest.raises(PlanError, match=match):
        validate_plan(plan, cost)


def test_multi_node_group_must_cover_whole_nodes():
    cm = build_cost_model(
        name="n",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=16,
        gpus_per_node=2,
        alpha1_ms_per_token2=0,
        alpha2_ms_per_token=0.01,
        beta1_ms=1.0,
        bandwidth_gbs={2: 1.0, 4: 1.0, 8: 1.0},
        limit_gb=1.0,
        model_states_mb=24.0,
        activation_mb_per_token=1.0,
    )
    plan = Plan(
        8, [10, 20, 30], [MicroBatch([Group([1, 2, 3, 4], [0]), Group([0], [1]), Group([5], [2]), Group([6, 7], [])])]
    )
    with pytest.raises(
        PlanError,
        match=r"a group larger than a node must span exactly 4/2 whole nodes, spans nodes "
        r"\[0, 1, 2\]",
    ):
        validate_plan(plan, cm)
    # no profiled bandwidth for degree 16 although it divides the heads
    plan16 = Plan(16, [10], [MicroBatch([Group(list(range(16)), [0])])])
    with pytest.raises(PlanError, match="cost model has no all-to-all bandwidth for degree 16"):
        validate_plan(plan16, cm)


def test_world_size_and_sequence_count_mismatch(cost):
    plan = Plan.from_dict(good_dict())
    with pytest.raises(PlanError, match="plan is for world size 8, but the job has 16 ranks"):
        validate_plan(plan, cost, world_size=16)
    with pytest.raises(PlanError, match="plan has 7 lengths, but the global batch has 8 sequences"):
        validate_plan(plan, cost, num_sequences=8)


@pytest.mark.parametrize(
    "text,match",
    [
        ("{", "not valid JSON"),
        ("[]", "expected an object, got list"),
        ('{"lengths": [1], "micro_batches": []}', r"missing field 'world_size'"),
        ('{"world_size": 2, "lengths": [1.5], "micro_batches": []}', r"'lengths\[0\]' = 1.5 is not an integer"),
        (
            '{"world_size": 2, "lengths": [1], "micro_batches": [{"groups": [{"ranks": ["0"]}]}]}',
            r"'micro_batches\[0\].groups\[0\].ranks\[0\]' = '0' is not an integer",
        ),
        ('{"world_size": 2, "lengths": [1], "micro_batches": {"groups": []}}', r"'micro_batches' must be a list"),
        ('{"world_size": true, "lengths": [1], "micro_batches": []}', r"'world_size\[0\]' = True is not an integer"),
    ],
)
def test_malformed_json(text, match):
    with pytest.raises(PlanError, match=match):
        Plan.from_json(text)


def test_solver_info_round_trip():
    p = Plan(
        1,
        [5],
        [MicroBatch([Group([0], [0])])],
        12.5,
        SolverInfo("flexsp", "optimal", 0.25, 10.0, {"micro_batches_tried": [1, 2]}),
    )
    q = Plan.from_json(p.to_json())
    assert q.solver == p.solver and q.estimated_time_ms == 12.5
    assert copy.deepcopy(q.to_dict()) == p.to_dict()
