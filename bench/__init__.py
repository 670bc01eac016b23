# SPDX-License-Identifier: Apache-2.0
"""epdrt benchmarks (shipped as ``epdrt.bench``; run with ``epdrt bench <name>``).

Each module has ``HELP``, ``add_arguments(parser)`` and ``run(args) -> list[Record]``.
"""

from epdrt.bench import (
    block_pool,
    capacity,
    decode,
    e2e,
    kernels,
    planner,
    serve,
    soak,
    transfer,
)

BENCHMARKS = {
    "block-pool": block_pool,
    "kernels": kernels,
    "decode": decode,
    "e2e": e2e,
    "transfer": transfer,
    "capacity": capacity,
    "planner": planner,
    "serve": serve,
    "soak": soak,
}
