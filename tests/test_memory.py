"""The C allocator's thresholds fixed for batch work (digitstream.memory), in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_CHILD = r"""
import json, resource, sys
import numpy as np
from digitstream.memory import keep_batch_memory

fixed = keep_batch_memory() if sys.argv[1] == "tuned" else None

def batch(sizes):
    # temporaries of a batch, touched as NumPy touches them, then freed
    arrays = [np.ones(size, dtype=np.uint8) for size in sizes]
    del arrays

sizes = [(i % 7 + 1) << 19 for i in range(24)]  # 0.5 to 3.5 MiB, 42 MiB in all
batch(sizes)  # the first batch takes its pages from the system
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    batch(sizes)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"fixed": fixed, "faults_per_batch": faults / 20}))
"""


def _run(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True,
                          timeout=60, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_memory_a_batch_frees_serves_the_next_without_page_faults():
    tuned = _run("tuned")
    assert tuned["fixed"] is True
    # 42 MiB a batch is 10,752 pages; the tuned allocator reuses them all
    assert tuned["faults_per_batch"] < 50, tuned
    untuned = _run("default")
    # glibc's own thresholds give some of them back each batch (the cost fixed above)
    assert untuned["faults_per_batch"] > 10 * max(tuned["faults_per_batch"], 1), untuned
