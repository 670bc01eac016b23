# SPDX-License-Identifier: Apache-2.0
"""An app served by uvicorn on a thread of this process: for embedding, benchmarks and tests."""

from __future__ import annotations

import threading
import time

import uvicorn

#: Seconds an idle connection stays open on the server (uvicorn's default is 5 s, the same as
#: httpx's pool expiry: a client may then send on a connection the server is closing).
KEEP_ALIVE_S = 30.0


class BackgroundServer:
    """Serves ``app`` on ``host`` (loopback) at a free port until ``stop()``; ``url`` once
    started. A context manager."""

    def __init__(self, app, host: str = "127.0.0.1", start_timeout_s: float = 60.0) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host=host, port=0, log_level="error", timeout_keep_alive=KEEP_ALIVE_S
            )
        )
        self.thread = threading.Thread(target=self.server.run, name="epdrt-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{host}:{port}"

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
