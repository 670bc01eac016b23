# SPDX-License-Identifier: Apache-2.0
"""Deployment configuration: stage counts, placement, batching limits and cache sizes."""

from __future__ import annotations

from typing import Literal

import msgspec

from epdrt import scheduler
from epdrt.errors import InvalidArgument

Mode = Literal["epd", "pd", "aggregated"]
Role = Literal["encode", "prefill", "decode"]


class EPDConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How to deploy a model. Sizes are per worker.

    Modes: ``epd`` runs encode, prefill and decode workers apart; ``pd`` runs encode and prefill
    together (the common non-disaggregated-encoder design) with decode apart; ``aggregated``
    runs all three stages in each worker. In ``pd`` the prefill count is the number of E+P
    workers; in ``aggregated`` it is the number of workers.
    """

    mode: Mode = "epd"
    num_encode: int = 1
    num_prefill: int = 1
    num_decode: int = 1
    #: "auto": one GPU per worker when enough GPUs are visible, fewer shared round robin
    #: (worker i on cuda:{i % n}), the CPU without any; or one device string
    #: per worker, in worker order (encoders, prefills, decoders).
    devices: Literal["auto"] | list[str] = "auto"
    #: CPU threads per worker on CPU hosts (torch intra-op threads).
    cpu_threads: int = 1
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    encode_max_batch_images: int = 8
    #: Most image tokens (MM tokens out of the vision tower, which its activations scale with)
    #: one encoder batch takes: eight large images do not run in a batch sized for small ones.
    #: A larger image still runs alone.
    encode_max_batch_tokens: int = 8192
    #: Most prompt tokens one prefill forward computes (a flat batch, no padding). A longer
    #: prompt is prefilled in chunks of at most this many tokens over several steps, each
    #: attending to the earlier chunks in the KV cache.
    prefill_max_batch_tokens: int = 4096
    decode_max_batch: int = 32
    #: Most sequences one decode worker runs at once (admitted: their KV in its cache, taking
    #: turns in batches of ``decode_max_batch``); the rest wait for one to end. KV blocks are
    #: allocated as sequences grow; when a step finds the cache full, the newest running
    #: sequence is preempted and later prefilled again with what it generated (recompute).
    max_num_seqs: int = 256
    kv_block_size: int = 16
    kv_cache_tokens: int = 16384
    mm_block_size: int = 16
    mm_cache_tokens: int = 8192
    max_images_per_request: int = 8
    max_image_bytes: int = 32 << 20
    max_image_pixels: int = 4096 * 4096
    #: The router's admission budget: at most this many requests, holding at most this many
    #: tokens (prompt + max_new_tokens each; one request alone may exceed it), are in the
    #: workers at once; the rest wait in the router's queue, in order. Every worker's queues
    #: are bounded by it.
    max_inflight_requests: int = 256
    max_inflight_tokens: int = 1 << 20
    #: Requests beyond this many waiting in the router's queue are rejected at once.
    max_queued_requests: int = 4096
    #: Seconds between a worker's live reports of its counters and cache use to the cluster
    #: (``EPDCluster.live_stats``, the server's /metrics); 0 turns them off.
    stats_interval_s: float = 1.0
    #: A worker that dies is started again (its requests fail with the reason), at most this
    #: many times per worker, after ``restart_backoff_s`` doubled at each restart.
    max_worker_restarts: int = 3
    restart_backoff_s: float = 0.5
    #: a request not finished this long after submission fails with a timeout error
    request_timeout_s: float = 600.0
    worker_start_timeout_s: float = 300.0
    #: How a prefilled sequence's KV reaches a decode worker in another process. "layerwise":
    #: the decoder reserves blocks when the prefill starts (``KVReserve`` / ``KVDest``), and
    #: the prefill worker pushes each layer's slice of the new blocks as soon as the layer is
    #: written, so the copy overlaps the remaining layers; the decoder starts when the last
    #: layer has landed (``KVReady(pushed=True)``). "pull": the decoder reserves blocks and
    #: copies the whole KV once the prefill has ended (``KVReady``), holding nothing before.
    kv_handoff: Literal["layerwise", "pull"] = "layerwise"
    #: The control channel between the router and the workers: "ipc" (unix sockets in the
    #: cluster's private run directory) or "tcp" (on ``control_host``, ports picked free; every
    #: message signed with a secret made for this cluster, unsigned or forged ones dropped).
    control: Literal["ipc", "tcp"] = "ipc"
    control_host: str = "127.0.0.1"
    #: Digest every hand-off (an image's MM tokens, a sequence's KV) on both sides and fail a
    #: request whose bytes arrived different (``runtime/integrity.py``; costs a read of each).
    verify_transfers: bool = False
    #: Keep each worker's log here (``<worker>.log``, appended to) instead of only in the
    #: cluster's run directory, which is removed at shutdown. Default: the environment
    #: variable ``EPDRT_WORKER_LOG_DIR``, if set.
    log_dir: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "num_prefill", "num_decode", "cpu_threads", "encode_max_batch_images",
            "encode_max_batch_tokens", "prefill_max_batch_tokens", "decode_max_batch",
            "max_num_seqs", "kv_block_size", "kv_cache_tokens",
            "mm_block_size", "mm_cache_tokens", "max_images_per_request", "max_image_bytes",
            "max_image_pixels", "max_inflight_requests", "max_inflight_tokens",
            "max_queued_requests",
        ):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidArgument(f"EPDConfig.{name} must be a positive int, got {value!r}")
        if self.mode == "epd" and self.num_encode <= 0:
            raise InvalidArgument("epd mode needs at least one encode worker")
        if self.request_timeout_s <= 0 or self.worker_start_timeout_s <= 0:
            raise InvalidArgument("timeouts must be positive")
        if not isinstance(self.max_worker_restarts, int) or self.max_worker_restarts < 0:
            raise InvalidArgument(
                f"max_worker_restarts must be an int >= 0, got {self.max_worker_restarts!r}"
            )
        if not self.restart_backoff_s >= 0:
            raise InvalidArgument(f"restart_backoff_s must be >= 0, got {self.restart_backoff_s}")
        if not self.stats_interval_s >= 0:
            raise InvalidArgument(f"stats_interval_s must be >= 0, got {self.stats_interval_s}")
        if self.control not in ("ipc", "tcp"):
            raise InvalidArgument(f"control must be 'ipc' or 'tcp', got {self.control!r}")
        if self.kv_handoff not in scheduler.KV_HANDOFFS:
            raise InvalidArgument(
                f"kv_handoff must be one of {scheduler.KV_HANDOFFS}, got {self.kv_handoff!r}"
            )
        if self.devices != "auto" and len(self.devices) != len(self.worker_roles()):
            raise InvalidArgument(
                f"devices lists {len(self.devices)} entries for {len(self.worker_roles())} workers"
            )

    def worker_roles(self) -> list[tuple[str, frozenset[str]]]:
        """(worker name, roles) for every worker, encoders first."""
        if self.mode == "aggregated":
            both = frozenset({"encode", "prefill", "decode"})
            return [(f"w{i}", both) for i in range(self.num_prefill)]
        workers: list[tuple[str, frozenset[str]]] = []
        if self.mode == "epd":
            workers += [(f"e{i}", frozenset({"encode"})) for i in range(self.num_encode)]
            workers += [(f"p{i}", frozenset({"prefill"})) for i in range(self.num_prefill)]
        else:
            workers += [
                (f"ep{i}", frozenset({"encode", "prefill"})) for i in range(self.num_prefill)
            ]
        workers += [(f"d{i}", frozenset({"decode"})) for i in range(self.num_decode)]
        return workers

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> EPDConfig:
        return msgspec.json.decode(data, type=cls)


class WorkerSpec(msgspec.Struct, kw_only=True):
    """Everything a worker process needs, passed to it as JSON on its command line."""

    name: str
    roles: list[str]
    device: str
    model_dir: str
    config: EPDConfig
    endpoint: str  # where this worker receives (ipc://... or tcp://...)
    cluster_endpoint: str  # where the cluster receives
    parent_pid: int
    cpus: list[int] = []  # CPU cores to pin to (CPU workers); empty: no pinning
