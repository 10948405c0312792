#!/usr/bin/env python3
"""Which GPUs this machine has, what PyTorch will see of them, and why.

    python check_gpus.py                 # table + problems, each with what to do
    python check_gpus.py --json          # the same as one JSON object
    python check_gpus.py --plan 15       # how many 15 GiB model replicas fit, per GPU and in total
    python check_gpus.py --torch         # also ask torch (CUDA build, devices, NCCL, peer access)
    MGPU_FAKE_GPUS=examples/scenarios/4x-rtx4090-gpu2-busy.json python check_gpus.py

The work is done in py/mgpu/check_gpus.py; this file only finds it.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.realpath(__file__)), "py"))

from mgpu.check_gpus import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
