#!/usr/bin/env python3
"""What one durable commit costs on this disk, at least: append 4 KiB and fdatasync, N times.

Usage: python3 bench/fsync_probe.py [DIR] [N]   (default: the current directory, 2000 times)
Prints p50 and p99 in microseconds. Bounded: N appends of 4 KiB, then the file is removed.
"""
import os
import sys
import tempfile
import time

directory = sys.argv[1] if len(sys.argv) > 1 else "."
n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
fd, path = tempfile.mkstemp(prefix="fsync-probe-", dir=directory)
try:
    block = b"x" * 4096
    lat = []
    for _ in range(n):
        os.write(fd, block)
        t = time.perf_counter()
        os.fdatasync(fd)
        lat.append(time.perf_counter() - t)
    lat.sort()
    print("4 KiB append + fdatasync in %s: p50 %.0f us, p99 %.0f us (%d times)"
          % (directory, lat[n // 2] * 1e6, lat[min(n - 1, n * 99 // 100)] * 1e6, n))
finally:
    os.close(fd)
    os.unlink(path)
