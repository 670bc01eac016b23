# SPDX-License-Identifier: Apache-2.0
"""Region: views, export/open across processes, closing, and no region left behind."""

import gc
import os
import signal
import struct
import subprocess
import sys
import textwrap
import uuid

import pytest
import torch
from leaks import holders, region_inodes

from epdrt import CudaUnavailable, InvalidArgument, Region, RegionError, _core
from epdrt.device import Device
from epdrt.region import DESCRIPTOR_BYTES

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8]
TIMEOUT_S = 60


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter, with ``env`` added to the environment."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env={**os.environ, **env},
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


# Descriptor layout (csrc/region.cc): the byte offset and struct format of each header field.
FIELDS = {"type": (8, "<i"), "index": (12, "<i"), "nbytes": (16, "<Q"), "pid": (32, "<i")}
RESERVED, UUID_AT = 36, 40
A_UUID = uuid.UUID("4a9c1f3e-0b6d-4e2a-9f17-8c5d3b2a1e07")


def patched(descriptor: bytes, offset: int, data: bytes) -> bytes:
    return descriptor[:offset] + data + descriptor[offset + len(data) :]


def with_fields(descriptor: bytes, **values: int) -> bytes:
    for name, value in values.items():
        offset, fmt = FIELDS[name]
        descriptor = patched(descriptor, offset, struct.pack(fmt, value))
    return descriptor


def cuda_descriptor(index: int = 3, device_uuid: uuid.UUID = A_UUID) -> bytes:
    """A well-formed descriptor of a CUDA region of process 1 (whose IPC handle opens nothing)."""
    desc = with_fields(Region.create(4096).export(), type=1, index=index, pid=1)
    return patched(desc, UUID_AT, device_uuid.bytes)


def test_descriptor_round_trip_of_a_cpu_region():
    region = Region.create(12288)
    desc = region.export()
    assert len(desc) == DESCRIPTOR_BYTES == 120 and desc[:8] == b"EPDRTRG2"
    info = Region.describe(desc)
    assert info.device == Device(0, 0) == region.device == region.opened_on
    assert info.device_uuid == uuid.UUID(int=0) == region.device_uuid
    assert (info.nbytes, info.id, info.creator_pid) == (12288, region.id, os.getpid())
    peer = Region.open(bytearray(desc))
    assert Region.describe(peer.export()) == info  # a peer re-exports the same fields
    assert peer.device_uuid == uuid.UUID(int=0)


def test_descriptor_of_a_cuda_region_carries_its_uuid():
    info = Region.describe(cuda_descriptor(index=3, device_uuid=A_UUID))
    assert info.device == Device(1, 3) and info.device_uuid == A_UUID
    assert info.nbytes == 4096 and info.creator_pid == 1


def test_cpu_regions_ignore_the_consumer_device():
    region = Region.create(4096)
    peer = Region.open(region.export(), device="cuda:3")  # host memory needs no device
    peer.tensor(torch.int32, (2,)).copy_(torch.tensor([5, 6]))
    assert region.tensor(torch.int32, (2,)).tolist() == [5, 6]


def _corrupt_descriptors() -> dict[str, object]:
    good = Region.create(4096).export()
    return {
        "empty": b"",
        "one byte short": good[:-1],
        "one byte long": good + b"\0",
        "old 104-byte format": b"EPDRTRG1" + good[8:104],
        "older magic, new size": patched(good, 0, b"EPDRTRG1"),
        "garbage": b"x" * DESCRIPTOR_BYTES,
        "zeros": bytes(DESCRIPTOR_BYTES),
        "unknown device type": with_fields(good, type=2),
        "zero size": with_fields(good, nbytes=0),
        "no creator": with_fields(good, pid=0),
        "reserved bytes set": patched(good, RESERVED, b"\1"),
        "cpu region with a uuid": patched(good, UUID_AT, A_UUID.bytes),
        "cpu region with a device index": with_fields(good, index=1),
        "cuda region without a uuid": cuda_descriptor(device_uuid=uuid.UUID(int=0)),
        "cuda region with a negative index": cuda_descriptor(index=-1),
        "not bytes": "not bytes",
    }


@pytest.mark.parametrize("case", list(_corrupt_descriptors()))
def test_corrupt_descriptors_are_rejected(case):
    descriptor = _corrupt_descriptors()[case]
    with pytest.raises(InvalidArgument):
        Region.describe(descriptor)
    with pytest.raises(InvalidArgument):
        Region.open(descriptor)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_opening_a_cuda_region_without_a_gpu_raises_cuda_unavailable():
    desc = cuda_descriptor()
    with pytest.raises(CudaUnavailable):
        Region.open(desc)
    with pytest.raises(CudaUnavailable):
        Region.open(desc, device="cuda:0")
    with pytest.raises(CudaUnavailable):
        _core.RegionHandle.open(desc, 0)  # the core's own check, without torch's
    with pytest.raises(InvalidArgument, match="CUDA device"):
        Region.open(desc, device="cpu")


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
        before_peer = region_inodes()
        peer = Region.open(desc)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=TIMEOUT_S)
    assert child.returncode == -signal.SIGKILL
    assert peer.tensor(torch.int64, (4,)).tolist() == [7, 8, 9, 10]
    with pytest.raises(RegionError):
        Region.open(desc)  # the creator is gone: nobody can open it any more
    (inode,) = region_inodes() - before_peer
    assert holders({inode}) == {os.getpid()}  # only the peer's mapping keeps it
    del peer
    gc.collect()
    assert holders({inode}) == set()  # the last mapping gone: the kernel frees it


def test_processes_that_exit_leave_no_region_behind():
    """Nothing of a process's regions and caches outlives it (they are memfds: /dev/shm
    would never show them, so look for their inodes in every process)."""
    result = run_python(
        """
        from epdrt import MMTokenCache, PagedKVCache, Region
        regions = [Region.create(1 << 22) for _ in range(4)]
        kv = PagedKVCache(2, 2, 8, 16, 32)
        mm = MMTokenCache(32, 16, 32)
        with open("/proc/self/maps") as f:
            print(" ".join({l.split()[4] for l in f if "memfd:epdrt-region" in l}))
        """
    )
    assert result.returncode == 0, result.stderr
    inodes = set(result.stdout.split())
    assert len(inodes) == 6
    assert holders(inodes) == set()


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
        assert peer.device.index == peer.opened_on.index == 0, peer
        assert str(peer.device_uuid) == "{region.device_uuid}"
        t = peer.tensor({dtype}, (256,), offset=4096)
        assert torch.equal(t.cpu(), torch.arange(256).to({dtype})), "mismatch"
        t.mul_(2)
        torch.cuda.synchronize()
        """
    )
    assert result.returncode == 0, result.stderr
    assert torch.equal(view, (torch.arange(256, device="cuda") * 2).to(dtype))


def torch_uuid(index: int) -> uuid.UUID:
    """UUID of CUDA device ``index`` as torch reports it."""
    return uuid.UUID(str(torch.cuda.get_device_properties(index).uuid).removeprefix("GPU-"))


@pytest.mark.gpu
def test_cuda_descriptor_names_the_device_by_uuid():
    region = Region.create(4096, "cuda:0")
    info = Region.describe(region.export())
    assert info.device == Device(1, 0) == region.device == region.opened_on
    assert info.device_uuid == region.device_uuid == torch_uuid(0) != uuid.UUID(int=0)


@pytest.mark.gpu
def test_opening_a_region_of_an_invisible_gpu_names_its_uuid():
    with pytest.raises(RegionError, match=f"GPU-{A_UUID} .*not visible"):
        Region.open(cuda_descriptor(device_uuid=A_UUID))


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def _region_on_cuda1() -> Region:
    region = Region.create(1 << 20, "cuda:1")
    region.tensor(torch.int32, (4,)).copy_(torch.tensor([1, 2, 3, 4], device="cuda:1"))
    torch.cuda.synchronize(1)
    return region


@pytest.mark.gpu
@two_gpus
def test_a_child_with_other_visible_devices_maps_the_right_gpu():
    # The child sees only our cuda:1, as its cuda:0: the UUID, not the index, finds it.
    region = _region_on_cuda1()
    result = run_python(
        f"""
        import torch
        from epdrt import Region
        peer = Region.open(bytes.fromhex("{region.export().hex()}"))
        assert peer.device.index == peer.opened_on.index == 0, peer
        assert peer.tensor(torch.int32, (4,)).tolist() == [1, 2, 3, 4]
        """,
        CUDA_VISIBLE_DEVICES=f"GPU-{region.device_uuid}",
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.gpu
@two_gpus
def test_a_peer_maps_a_region_on_its_own_device_when_it_can_reach_it():
    region = _region_on_cuda1()
    reach = torch.cuda.can_device_access_peer(0, 1)
    result = run_python(
        f"""
        import torch
        from epdrt import Region
        torch.cuda.set_device(0)
        peer = Region.open(bytes.fromhex("{region.export().hex()}"))  # for torch's cuda:0
        assert peer.device.index == 1, peer
        assert peer.opened_on.index == {0 if reach else 1}, peer
        view = peer.tensor(torch.int32, (4,))
        assert view.device == peer.opened_on.torch
        assert view.tolist() == [1, 2, 3, 4]
        """
    )
    assert result.returncode == 0, result.stderr
