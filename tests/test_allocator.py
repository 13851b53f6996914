"""Freed memory stays in the process (flexens.allocator): a network called again on a large
batch reuses its activations' pages instead of faulting fresh ones in on every call."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flexens.allocator import retain_freed_memory

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import resource, sys, torch
from flexens.allocator import retain_freed_memory
from flexens.members.inference_form import inference_network
from flexens.members.networks import create_network

if sys.argv[1] == "retain":
    assert retain_freed_memory()
torch.set_num_threads(1)
network = inference_network(create_network("small_cnn", num_classes=10, width=16, depth=4))
x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    for _ in range(5):
        network(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        network(x)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.skipif(not retain_freed_memory(), reason="glibc's malloc only")
def test_a_member_at_a_large_batch_faults_no_fresh_pages_once_freed_memory_is_kept():
    runs = {
        mode: subprocess.Popen(
            [sys.executable, "-c", PROBE, mode], stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        for mode in ("default", "retain")
    }
    faults = {
        mode: float(run.communicate(timeout=120)[0].split()[-1]) for mode, run in runs.items()
    }
    # glibc by default hands the activations' pages back and faults them in again per call
    assert faults["default"] > 1000, faults
    assert faults["retain"] < faults["default"] / 10, faults
