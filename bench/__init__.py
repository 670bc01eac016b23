# SPDX-License-Identifier: Apache-2.0
"""epdrt benchmarks (shipped as ``epdrt.bench``; run with ``epdrt bench <name>``).

Each module has ``HELP``, ``add_arguments(parser)`` and ``run(args) -> list[Record]``.
"""

from epdrt.bench import block_pool

BENCHMARKS = {
    "block-pool": block_pool,
}
