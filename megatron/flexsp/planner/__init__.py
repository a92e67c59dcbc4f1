"""Planner: cost model, bucketing, sequence blaster, MILP, baselines. Never imports torch."""
