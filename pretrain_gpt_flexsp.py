#!/usr/bin/env python
"""Pre-train a GPT with FlexSP heterogeneous sequence parallelism, Megatron-style flags.

    torchrun --nproc-per-node 4 pretrain_gpt_flexsp.py --num-layers 2 --hidden-size 64 \\
        --num-attention-heads 4 --seq-length 2048 --global-batch-size 32 --train-iters 20 --sp-mode flexsp

Also launched by srun (SLURM_PROCID / SLURM_NTASKS) or as one plain process. See --help.
Imports stay inside main(): the planner's background process (spawn) re-imports this file.
"""

import sys


def main() -> int:
    from megatron.flexsp.training.loop import main as _main

    return _main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
