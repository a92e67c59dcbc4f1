"""Runtime: SP group pool, all-to-all attention, packing, loss, FSDP2, executor."""
