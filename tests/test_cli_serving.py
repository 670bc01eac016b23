# SPDX-License-Identifier: Apache-2.0
"""The serving commands on the tiny models: ``run``, ``demo``, ``bench e2e``,
``make-tiny-model``."""

from __future__ import annotations

import json

import torch
from model_utils import make_image, reference_tokens

from epdrt.cli import main
from epdrt.models import load_adapter

RESULT_KEYS = {"id", "token_ids", "text", "ttft_s", "tpot_s", "encode_s", "error"}


def test_make_tiny_model(tmp_path):
    out = tmp_path / "qwen"
    assert (
        main(
            ["make-tiny-model", str(out), "--arch", "qwen2-vl", "--json", str(tmp_path / "m.json")]
        )
        == 0
    )
    info = json.loads((tmp_path / "m.json").read_text())
    assert info["model_type"] == "qwen2_vl"
    assert load_adapter(out).spec.image_placeholder == "<|vision_start|><|image_pad|><|vision_end|>"


def test_make_small_model_draws_its_weights_at_load(tmp_path):
    out = tmp_path / "small"
    argv = ["make-tiny-model", str(out), "--arch", "llava", "--size", "small"]
    assert main([*argv, "--json", str(tmp_path / "m.json")]) == 0
    info = json.loads((tmp_path / "m.json").read_text())
    assert info["weights"] == "random at load" and 4e6 < info["num_parameters"] < 8e6
    adapter = load_adapter(out)
    s = adapter.spec
    assert (s.num_layers, s.hidden_size, s.num_kv_heads, s.head_dim) == (4, 256, 2, 64)
    assert s.dtype == torch.float32 and s.max_context == 8192
    image = adapter.preprocess_image(make_image(112, 112, 0))
    prepared = adapter.tokenize("USER: <image> what ASSISTANT:", [image])
    assert prepared.input_ids.count(s.image_token_id) == 64  # 112 px / 14 px patches, squared


def test_run_jsonl(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llava")
    make_image(40, 30, 1).save(tmp_path / "a.png")
    make_image(64, 48, 2).save(tmp_path / "b.jpg")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    lines = [
        {"id": "one", "prompt": "USER: <image>\nWhat? ASSISTANT:", "images": ["a.png"],
         "max_new_tokens": 5},
        {"id": "two", "prompt": "<image> vs <image>", "images": ["a.png", "b.jpg"],
         "max_new_tokens": 4},
        {"id": "text", "prompt": "just text", "images": [], "max_new_tokens": 3},
        {"id": "bad", "prompt": "<image>", "images": ["corrupt.png"], "max_new_tokens": 3},
    ]  # fmt: skip
    # Lines that cannot become a request: each gets its own error, the rest run.
    invalid = [
        ({"id": "neg", "prompt": "x", "max_new_tokens": -3}, '"max_new_tokens" must be a positive'),
        ({"id": "str", "prompt": "<image>", "images": "a.png"}, "list of image paths, got str"),
        ({"id": "flag", "prompt": "x", "max_new_tokens": True}, "positive integer, got bool"),
        ({"id": "noprompt", "images": []}, '"prompt" must be a string, got NoneType'),
        ({"id": "one", "prompt": "again"}, "'one' is used by an earlier line"),
        ([1, 2], "a JSON object, got list"),
        ({"id": "hot", "prompt": "x", "temperature": -1}, "temperature must be in [0, 100]"),
    ]
    requests = tmp_path / "requests.jsonl"
    text = "".join(json.dumps(x) + "\n" for x in [*lines, *(row for row, _ in invalid)])
    requests.write_text(text + "{not json\n")
    out = tmp_path / "out.json"
    args = ["run", "--model", model, "--requests", str(requests), "--mode", "epd"]
    assert main([*args, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["id"]: r for r in report["requests"]}
    assert all(r.keys() >= RESULT_KEYS for r in rows.values())
    adapter = load_adapter(model)
    for line in lines[:3]:
        prepared = adapter.prepare(line["prompt"], [tmp_path / p for p in line["images"]])
        expected = reference_tokens(adapter, [prepared], line["max_new_tokens"])[0]
        assert rows[line["id"]]["token_ids"] == expected
        assert rows[line["id"]]["error"] is None and rows[line["id"]]["ttft_s"] > 0
    assert rows["bad"]["error"] and rows["bad"]["token_ids"] == []
    ids = [r["id"] for r in report["requests"]]  # file order; unnamed lines by number
    assert ids == ["one", "two", "text", "bad", "neg", "str", "flag", "noprompt", "line9",
                   "line10", "hot", "line12"]  # fmt: skip
    for rid, (_, message) in zip(ids[4:], invalid):
        assert message in rows[rid]["error"] and rows[rid]["token_ids"] == [], rid
    assert "not JSON" in rows["line12"]["error"]
    assert report["summary"]["requests"] == 12 and report["summary"]["failed"] == 9


def test_run_reports_user_errors_in_one_line(tiny_model_dir, tmp_path, capsys):
    requests = tmp_path / "r.jsonl"
    requests.write_text('{"prompt": "x"}\n')
    missing = ["run", "--model", str(tmp_path / "nowhere"), "--requests", str(requests)]
    assert main(missing) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"epdrt run: error: {tmp_path / 'nowhere'} is not a model directory"
                   " (no config.json in it)"]  # fmt: skip
    unreadable = ["run", "--model", tiny_model_dir("llava"), "--requests", str(tmp_path / "no")]
    assert main(unreadable) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("epdrt run: error: cannot read the request file")


def test_demo_and_bench_e2e(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--requests", "6", "--rate", "20"]) == 0
    report = json.loads((out / "demo.json").read_text())
    assert report["token_mismatches"] == []
    assert [r["label"] for r in report["runs"]] == ["epd 1E+1P+1D", "aggregated"]
    assert all(r["summary"]["failed"] == 0 for r in report["runs"])
    assert (out / "demo.png").stat().st_size > 0

    records = tmp_path / "e2e.jsonl"
    model = str(out / "tiny-llava")
    args = ["bench", "e2e", "--model", model, "--requests", "4", "--rate", "20"]
    assert main([*args, "--kv-handoff", "layerwise,pull", "--json", str(records)]) == 0
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert {r["baseline"] for r in rows} == {"pd", "aggregated", "epd-pull"}
    assert all(r["bench"] == "e2e" and r["value"] > 0 and r["ratio"] > 0 for r in rows)
    (handoff,) = [r for r in rows if r["metric"] == "KV hand-off mean s" and
                  r["baseline"] == "epd-pull"]  # fmt: skip
    assert handoff["extra"]["kv_handoff"] == "layerwise"
    placement = rows[0]["extra"]
    assert placement["devices"]["epd"] == {"e0": "cpu", "p0": "cpu", "d0": "cpu"}
    assert not any(placement["workers_share_devices"].values())
    assert records.with_suffix(".png").exists()
