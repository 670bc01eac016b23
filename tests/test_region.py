# SPDX-License-Identifier: Apache-2.0
"""Region: views, export/open across processes, closing, and nothing left behind in /dev/shm."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from epdrt import CudaUnavailable, InvalidArgument, Region, RegionError, _core

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8]
TIMEOUT_S = 60


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 7, 4)])
def test_tensor_views_share_memory(dtype, shape):
    region = Region.create(4096)
    view = region.tensor(dtype, shape, offset=64)
    assert view.shape == shape and view.dtype == dtype and view.is_contiguous()
    data = torch.arange(view.numel()).reshape(shape).to(dtype)
    view.copy_(data)
    again = region.tensor(dtype, shape, offset=64)
    assert torch.equal(again, data)
    assert region.tensor(torch.uint8, (64,)).count_nonzero() == 0  # bytes before offset untouched


def test_open_in_same_process_maps_the_same_memory():
    region = Region.create(1 << 20)
    peer = Region.open(region.export())
    assert peer.id == region.id and peer.nbytes == region.nbytes
    assert not peer.is_owner and region.is_owner
    peer.tensor(torch.int32, (4,), offset=1024).copy_(torch.tensor([1, 2, 3, 4]))
    assert region.tensor(torch.int32, (4,), offset=1024).tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("dtype", "shape", "offset"),
    [(torch.float32, (2,), 2), (torch.float32, (1025,), 0), (torch.int64, (-1,), 0)],
)
def test_bad_views_are_rejected(dtype, shape, offset):
    region = Region.create(4096)
    with pytest.raises(InvalidArgument):
        region.tensor(dtype, shape, offset)


@pytest.mark.parametrize("nbytes", [0, -5, 1.5, True])
def test_bad_sizes_are_rejected(nbytes):
    with pytest.raises(InvalidArgument):
        Region.create(nbytes)


@pytest.mark.parametrize(
    "descriptor", [b"", b"x" * 104, bytes(104), "not bytes", b"EPDRTRG1" + bytes(96)]
)
def test_bad_descriptors_are_rejected(descriptor):
    with pytest.raises(InvalidArgument):
        Region.open(descriptor)


def test_close_stops_new_use_but_keeps_views_valid():
    region = Region.create(4096)
    desc = region.export()
    view = region.tensor(torch.float32, (8,))
    view.fill_(3.0)
    region.close()
    assert region.closed
    with pytest.raises(InvalidArgument):
        region.tensor(torch.float32, (8,))
    with pytest.raises(InvalidArgument):
        region.export()
    with pytest.raises(RegionError, match="exited or closed"):
        Region.open(desc)
    del region
    assert view.sum().item() == 24.0  # the view keeps the memory mapped


def test_a_child_process_writes_into_our_region():
    region = Region.create(1 << 16)
    result = run_python(
        f"""
        import torch
        from epdrt import Region
        peer = Region.open(bytes.fromhex("{region.export().hex()}"))
        peer.tensor(torch.float16, (100,), offset=512).copy_(torch.arange(100))
        """
    )
    assert result.returncode == 0, result.stderr
    assert torch.equal(region.tensor(torch.float16, (100,), offset=512), torch.arange(100.0).half())


def test_killed_creator_leaks_nothing_and_peers_keep_their_mapping():
    before = shm_entries()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import sys, time, torch
                from epdrt import Region
                r = Region.create(1 << 20)
                r.tensor(torch.int64, (4,)).copy_(torch.tensor([7, 8, 9, 10]))
                print(r.export().hex(), flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        desc = bytes.fromhex(child.stdout.readline().strip())
        peer = Region.open(desc)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=TIMEOUT_S)
    assert child.returncode == -signal.SIGKILL
    assert peer.tensor(torch.int64, (4,)).tolist() == [7, 8, 9, 10]
    with pytest.raises(RegionError):
        Region.open(desc)  # the creator is gone: nobody can open it any more
    assert shm_entries() == before


def test_processes_that_exit_leave_nothing_in_dev_shm():
    before = shm_entries()
    result = run_python(
        """
        from epdrt import MMTokenCache, PagedKVCache, Region
        regions = [Region.create(1 << 22) for _ in range(4)]
        kv = PagedKVCache(2, 2, 8, 16, 32)
        mm = MMTokenCache(32, 16, 32)
        """
    )
    assert result.returncode == 0, result.stderr
    assert shm_entries() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cuda_region_without_a_gpu_raises_cuda_unavailable():
    with pytest.raises(CudaUnavailable):
        Region.create(1024, "cuda")
    with pytest.raises(CudaUnavailable):
        _core.RegionHandle.create(1024, 1, 0)


@pytest.mark.parametrize("device", ["tpu", "mps", 3.5])
def test_unknown_devices_are_rejected(device):
    with pytest.raises(InvalidArgument):
        Region.create(1024, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_region_views_and_ipc_in_a_child(dtype):
    region = Region.create(1 << 20, "cuda:0")
    view = region.tensor(dtype, (256,), offset=4096)
    assert view.device.type == "cuda"
    view.copy_(torch.arange(256, device="cuda").to(dtype))
    same = Region.open(region.export())  # same process: aliases the live region
    assert torch.equal(same.tensor(dtype, (256,), offset=4096), view)
    result = run_python(
        f"""
        import torch
        from epdrt import Region
        peer = Region.open(bytes.fromhex("{region.export().hex()}"))
        t = peer.tensor({dtype}, (256,), offset=4096)
        assert torch.equal(t.cpu(), torch.arange(256).to({dtype})), "mismatch"
        t.mul_(2)
        torch.cuda.synchronize()
        """
    )
    assert result.returncode == 0, result.stderr
    assert torch.equal(view, (torch.arange(256, device="cuda") * 2).to(dtype))
