# SPDX-License-Identifier: Apache-2.0
"""The EPD stage runtime: workers, router (EPDCluster), configuration and workloads."""

from epdrt.runtime.cluster import EPDCluster
from epdrt.runtime.config import EPDConfig
from epdrt.runtime.request import Request, RequestError, RequestResult

__all__ = ["EPDCluster", "EPDConfig", "Request", "RequestError", "RequestResult"]
