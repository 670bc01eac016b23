# SPDX-License-Identifier: Apache-2.0
"""Vectorized torch implementations: the CPU path of the kernels that have one (checked
against ``epdrt.kernels.reference``, which favours clarity over speed)."""
