# SPDX-License-Identifier: Apache-2.0
"""``epdrt profile``: measure a model's stage profile on this device for the planner.

Per stage, latency against batch shape (encode: images per batch and image size; prefill:
tokens; decode: batch size and context length) and peak memory, the cost of moving bytes
between workers (from ``epdrt bench transfer --json`` records with ``--transfer``, else the
transfer benchmark's quick cases, run here) and the runtime's fixed costs (the router's
preprocessing, a control message, the wake-up cost after idling); fits piecewise-linear
models and saves them as JSON for ``epdrt plan --profile``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Any

from epdrt.commands import add_json_option


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="measure per-stage latency/memory models of a model on this device (planner)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model directory (config, weights, processor)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: model's")
    p.add_argument("--name", help="profile name (default: '<model dir> on <device>')")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    p.add_argument(
        "--threads", type=int, default=1, help="CPU torch threads (1, as each runtime worker)"
    )
    p.add_argument("--transfer", help="JSON lines of 'epdrt bench transfer' (link cost)")
    p.add_argument("--transport", default="ipc", help="transport of --transfer records to use")
    p.add_argument(
        "--no-overheads",
        action="store_true",
        help="skip the runtime's fixed costs (router preprocessing, messages, wake-up)",
    )
    add_json_option(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import torch

    from epdrt.errors import EpdrtError
    from epdrt.planner.model_runner import profile_model
    from epdrt.planner.profiler import load_transfer_records

    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[profile {time.perf_counter() - t0:5.1f}s] {msg}", file=sys.stderr, flush=True)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    try:
        if args.transfer:
            transfer = load_transfer_records(args.transfer, args.transport)
            note = f"{args.transport} records of {args.transfer}"
        else:
            from epdrt.bench.transfer import link_for_profile

            transfer, note = link_for_profile(
                "cuda" if device.startswith("cuda") else "cpu", progress
            )
        profile = profile_model(
            args.model,
            device=device,
            dtype=args.dtype,
            name=args.name,
            quick=args.quick,
            transfer=transfer,
            transfer_note=note,
            overheads=not args.no_overheads,
            progress=progress,
        )
    except (EpdrtError, OSError, ValueError) as e:
        print(f"epdrt profile: {e}", file=sys.stderr)
        return 2
    if args.json == "-":  # stdout is the JSON: the summary goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            _print_summary(profile)
        print(json.dumps(profile.to_dict(), indent=1))
    else:
        _print_summary(profile)
        if args.json:
            profile.save(args.json)
            print(f"profile: {args.json}")
    progress("done")
    return 0


def _print_summary(profile: Any) -> None:
    s = profile.samples
    m, t, o = profile.memory, profile.transfer, profile.overheads
    print(f"{profile.name} [{profile.source}] on {profile.device}")
    enc = [f"{int(n)}x{int(tpi)}={sec * 1e3:.2f}" for n, tpi, sec in s.get("encode", [])]
    pre = [f"{int(n)}={sec * 1e3:.2f}" for n, sec in s.get("prefill", [])]
    batch = [f"{int(b)}x{int(n)}={sec * 1e3:.2f}" for b, n, sec in s.get("prefill_batch", [])]
    dec = [f"{int(b)}x{int(tot // b)}={sec * 1e3:.2f}" for b, tot, sec in s.get("decode", [])]
    print("encode   images x tokens/image -> ms: " + ", ".join(enc))
    print("prefill  tokens -> ms: " + ", ".join(pre))
    if batch:
        print("prefill  padded batch, requests x tokens -> ms: " + ", ".join(batch))
    print("decode   batch x context/seq -> ms/step: " + ", ".join(dec))
    print(
        f"memory   weights encode {m.encode_weight_bytes / 2**20:.1f} MiB, LM "
        f"{m.lm_weight_bytes / 2**20:.1f} MiB; KV {m.kv_bytes_per_token:.0f} B/token; "
        f"activations {m.encode_activation_bytes_per_token:.0f} B/image token, "
        f"{m.prefill_activation_bytes_per_token:.0f} B/prefill token"
    )
    print(f"transfer {t.latency_s * 1e6:.1f} us + {t.bytes_per_s / 1e9:.2f} GB/s")
    print(
        f"runtime  prepare {o.prepare_s * 1e3:.2f} ms + {o.prepare_per_image_s * 1e3:.2f} ms/image,"
        f" message {o.message_s * 1e6:.0f} us, wake-up {o.wake_s * 1e3:.2f} ms "
        f"(tau {o.wake_tau_s * 1e3:.0f} ms)"
    )
