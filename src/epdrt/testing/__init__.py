# SPDX-License-Identifier: Apache-2.0
"""Executable specs shared by tests and benchmarks: the pure-Python block pool."""
