"""Training: the Megatron-style trainer built on the planner and the runtime.

Data flows one way: ``arguments`` (flags, validation) -> ``configs`` (one dataclass per concern)
-> ``trainer.Trainer`` (set-up, ``train_step``, evaluation), which uses ``planner_hook`` (plans
ahead on rank 0), ``checkpointer`` (when to save) over ``checkpointing`` (how, on disk),
``resilience`` (signals, non-finite steps, the watchdog), ``optimizer`` and ``logging_utils``.
``distributed`` starts and ends processes for every entry point (``loop.main``, ``profiler.main``).
"""
