"""retain_freed_memory: a training step's freed multi-megabyte buffers are reused, not faulted in again."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Page faults taken by 50 rounds of four 8 MiB tensors alive at once, written and freed (a step's
# gradients), after a warm-up. glibc's default trims what it gets back in many processes (about
# 400,000 faults then, 2048 per buffer), keeps it in others: where it lands depends on the heap's
# layout, so only the retained side is deterministic enough to assert.
FAULTS = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from ebtrain.host_memory import retain_freed_memory
retained = retain_freed_memory()
def churn(n):
    for _ in range(n):
        buffers = [torch.ones(2 * 1024 * 1024) for _ in range(4)]
        del buffers
churn(5)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn(50)
print(retained, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_buffers_are_reused_not_faulted_in_again():
    for _ in range(3):  # three fresh processes, three heap layouts
        out = subprocess.run([sys.executable, "-c", FAULTS.format(root=str(ROOT))], capture_output=True, text=True,
                             check=True).stdout.split()
        assert out[0] == "True"  # mallopt took both settings
        assert int(out[1]) < 2048  # not one buffer's worth of fresh pages in 200 allocations
