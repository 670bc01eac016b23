# SPDX-License-Identifier: Apache-2.0
"""Helpers shared by the benchmarks."""

import os
import select
import subprocess
import sys
import time

import pytest

from epdrt.benchmarking import process_cpu_seconds


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_process_cpu_seconds_counts_a_childs_busy_time_not_its_sleep():
    busy = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    # It says when its busy loop is over: then only its sleep is left.
    script = busy + "\nprint('slept', flush=True)\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 30)
        assert ready and child.stdout.readline().strip() == "slept"
        spent = process_cpu_seconds(child.pid)
        assert 0.3 <= spent < 1.5  # the busy loop and the interpreter's start, not the sleep
        time.sleep(0.3)
        assert process_cpu_seconds(child.pid) - spent < 0.1
    finally:
        child.kill()
        child.wait(10)
    with pytest.raises(OSError):
        process_cpu_seconds(child.pid)


def test_process_cpu_seconds_of_this_process_matches_os_times():
    t = os.times()
    assert process_cpu_seconds(os.getpid()) == pytest.approx(t.user + t.system, abs=0.05)
