"""Planners that misbehave on purpose (imported by the planner hook's background process in tests).

A batch whose first length is 13 makes the planner raise; 17 makes it sleep 3 s (a late plan);
anything else is planned normally.
"""

import time

from megatron.flexsp.training.planner_hook import plan_inline


def faulty_plan(lengths, cost, cfg_dict, fallback=False):
    if lengths[0] == 13:
        raise RuntimeError("injected planner failure")
    if lengths[0] == 17:
        time.sleep(3.0)
    return plan_inline(lengths, cost, cfg_dict, fallback=fallback)
