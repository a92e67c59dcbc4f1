"""Training: arguments, loop, checkpointing, logging, profiler."""
