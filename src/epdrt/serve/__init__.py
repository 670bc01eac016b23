# SPDX-License-Identifier: Apache-2.0
"""``epdrt serve``: an OpenAI-compatible HTTP server over an ``EPDCluster``.

Needs the ``serve`` extra (``pip install epdrt[serve]``: FastAPI, uvicorn, prometheus-client).
"""
