"""Patches applied to megatron.core at start-up (parallel_state, layer specs, CPU compatibility)."""
