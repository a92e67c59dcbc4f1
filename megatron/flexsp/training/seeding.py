"""One seed for every random source of a run, set the same way on every rank.

Why a module: the trainer and the tests seed identically (megatron's RNG tracker, torch, numpy,
Python), and the one rank-dependent part (attention-dropout masks of an SP group) must be
seeded right next to the rest.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from flexsp_patches import cpu_compat
from megatron.flexsp.runtime.sp_dropout import add_sp_dropout_state

__all__ = ["seed_everything"]


def seed_everything(seed: int, device_type: str | None = None, rank: int = 0) -> None:
    """Megatron's model-parallel RNG tracker, torch, numpy and Python: one seed for every rank.

    ``device_type`` is the run's ("cpu": a gloo run on a GPU node seeds no CUDA state); ``rank`` offsets
    only the attention-dropout state, so SP ranks holding other heads draw other masks.
    """
    cpu_compat.init_model_parallel(seed, device_type=device_type)
    add_sp_dropout_state(seed, rank)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
