# SPDX-License-Identifier: Apache-2.0
"""Reference implementations shared by tests and benchmarks (the executable spec)."""
