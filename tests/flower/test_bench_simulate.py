import os
import subprocess
import sys

from securemark.bench.simulate import PeakMemory, tree_rss


def test_peak_memory_counts_the_processes_a_run_starts():
    alone = tree_rss(os.getpid())
    with PeakMemory(interval=0.05) as mem:
        child = "x = bytearray(200 * 2**20); import time; time.sleep(0.5)"  # 200 MiB, touched
        subprocess.run([sys.executable, "-c", child], check=True)
    assert mem.peak - alone > 150 * 2**20
