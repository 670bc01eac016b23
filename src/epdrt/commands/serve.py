# SPDX-License-Identifier: Apache-2.0
"""``epdrt serve``: an OpenAI-compatible HTTP server over an EPD cluster.

Starts the cluster (the same options as ``epdrt run``), then serves ``/v1/chat/completions``,
``/v1/completions``, ``/v1/models``, ``/health`` and ``/metrics`` on ``--host``/``--port``
(loopback unless told otherwise). SIGINT or SIGTERM stops the server and then the cluster:
no worker process is left behind. ``--json PATH`` writes where it listens once it does
(``{"url", "model", "workers"}``), so a script can start it with ``--port 0``.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from epdrt.commands import (
    UsageError,
    add_cluster_options,
    add_json_option,
    cluster_config,
    write_json,
)


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server over an EPD cluster", description=__doc__
    )
    add_cluster_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--served-model-name", help="the model's name in requests (default: its dir)")
    p.add_argument("--chat-template", help="Jinja chat template file (default: the model's)")
    p.add_argument("--allowed-local-media-path", help="directory file:// image URLs may read from")
    p.add_argument("--max-queued", type=int, default=256,
                   help="requests waiting beyond this get 503 with Retry-After")  # fmt: skip
    p.add_argument("--max-tokens-default", type=int, default=256,
                   help="output limit of a request that sets none")  # fmt: skip
    p.add_argument("--max-body-mib", type=float, default=64.0,
                   help="request bodies over this many MiB get 413")  # fmt: skip
    p.add_argument("--log-level", default="warning", help="uvicorn's log level")
    add_json_option(p)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401

        import epdrt.serve.app  # noqa: F401
    except ImportError as exc:
        error = f"epdrt serve needs the serve extra (pip install epdrt[serve]): {exc}"
        raise UsageError(error) from exc
    config = cluster_config(args)
    model = Path(args.model)
    if args.chat_template is not None and not Path(args.chat_template).is_file():
        raise UsageError(f"no chat template file {args.chat_template}")
    media = args.allowed_local_media_path
    if media is not None and not Path(media).is_dir():
        raise UsageError(f"--allowed-local-media-path {media} is not a directory")
    if args.max_queued < 0 or args.max_tokens_default <= 0 or args.max_body_mib <= 0:
        raise UsageError("--max-queued must be >= 0, --max-tokens-default and --max-body-mib > 0")
    listener = socket.create_server((args.host, args.port))  # bound before the slow start-up
    host, port = listener.getsockname()[:2]
    print(f"epdrt serve: starting {config.mode} workers {[n for n, _ in config.worker_roles()]}",
          file=sys.stderr)  # fmt: skip
    # SIGTERM stops the start-up like Ctrl-C (the cluster shuts down); uvicorn takes both
    # signals over while it serves and raises them again once it has stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        _run_server(args, model, config, listener, f"http://{host}:{port}", media)
    print("epdrt serve: stopped", file=sys.stderr)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _run_server(args, model: Path, config, listener: socket.socket, url: str, media) -> None:
    import uvicorn

    from epdrt.runtime.cluster import EPDCluster
    from epdrt.serve.app import ServeSettings, build_app
    from epdrt.serve.background import KEEP_ALIVE_S
    from epdrt.serve.chat import load_template

    with EPDCluster.launch(model, config) as cluster:
        settings = ServeSettings(
            served_model_name=args.served_model_name or model.resolve().name,
            api_key=args.api_key,
            chat_template=load_template(model, args.chat_template, cluster.pre.adapter.tokenizer),
            allowed_media=Path(media) if media else None,
            max_queued=args.max_queued,
            default_max_tokens=args.max_tokens_default,
            max_body_bytes=int(args.max_body_mib * (1 << 20)),
        )
        app = build_app(cluster, settings)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_level=args.log_level,
                lifespan="off",
                timeout_graceful_shutdown=5,
                timeout_keep_alive=KEEP_ALIVE_S,
            )
        )
        workers = {n: sorted(r) for n, r in config.worker_roles()}
        announce = threading.Thread(
            target=_announce, args=(server, url, settings.served_model_name, workers, args.json),
            daemon=True,
        )  # fmt: skip
        announce.start()
        server.run(sockets=[listener])  # returns on SIGINT/SIGTERM, after open requests end


def _announce(server, url: str, name: str, workers: dict, json_path: str | None) -> None:
    """Says where the server listens once it does (and writes it to ``json_path``)."""
    while not server.started and not server.should_exit:
        time.sleep(0.02)
    if server.started:
        print(f"epdrt serve: {name} on {url}", file=sys.stderr)
        if json_path:
            write_json({"url": url, "model": name, "workers": workers}, json_path)
