"""retain_freed_memory: freed multi-megabyte buffers are reused instead of faulted in again."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Page faults taken by 50 rounds of four 8 MiB tensors alive at once, written and freed (a step's
# gradients), after a warm-up: by default glibc trims the 32 MiB it gets back each round.
FAULTS = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from ebtrain.host_memory import retain_freed_memory
retained = retain_freed_memory() if sys.argv[1] == "retain" else False
def churn(n):
    for _ in range(n):
        buffers = [torch.ones(2 * 1024 * 1024) for _ in range(4)]
        del buffers
churn(5)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn(50)
print(retained, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS.format(root=str(ROOT)), mode], capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_buffers_are_reused_not_faulted_in_again():
    retained, faults_retained = _faults("retain")
    _, faults_default = _faults("default")
    assert retained == "True"
    assert faults_default > 50 * 4 * 1000  # glibc's default: each 8 MiB buffer is 2048 fresh pages
    assert faults_retained < faults_default / 20
