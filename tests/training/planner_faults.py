"""Planners that misbehave on purpose (imported by the planner hook's background process in tests).

A batch whose first length is 13 makes the planner raise; 17 makes it sleep 3 s (a late plan);
19 makes it hang (sleep an hour) once per marker file ``$FLEXSP_TEST_PLANNER_HANG_MARKER`` (the
restarted worker then plans normally); anything else is planned normally. With
``$FLEXSP_TEST_PLANNER_IMPORT_SLEEP`` set, importing this module sleeps that many seconds (a
worker that is alive but slow, or never, ready); the variable is set only around the hook's spawn.
"""

import os
import time

from megatron.flexsp.planner.api import PlannerConfig
from megatron.flexsp.training.planner_hook import plan_inline

if os.environ.get("FLEXSP_TEST_PLANNER_IMPORT_SLEEP"):
    time.sleep(float(os.environ["FLEXSP_TEST_PLANNER_IMPORT_SLEEP"]))


def faulty_plan(lengths, cost, cfg: PlannerConfig, fallback=False):
    if lengths[0] == 13:
        raise RuntimeError("injected planner failure")
    if lengths[0] == 17:
        time.sleep(3.0)
    if lengths[0] == 19:
        marker = os.environ.get("FLEXSP_TEST_PLANNER_HANG_MARKER")
        if marker and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(3600.0)
    return plan_inline(lengths, cost, cfg, fallback=fallback)
