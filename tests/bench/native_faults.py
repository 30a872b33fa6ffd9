#!/usr/bin/env python3
"""Functions of ferry-proxy that ran natively but sit outside the ordered hot code (see
tests/bench/hot-symbols).

callgrind records which functions run, but on valgrind's CPU: it has no AVX-512 and none of the
extensions ring dispatches on, so glibc's string functions and ring's crypto choose other
variants there than on the real machine (e.g. __memmove_avx512_unaligned_erms natively where
callgrind saw __memcpy_avx_unaligned_erms). A variant missed that way is placed among the cold
code and costs a 64 KiB block of resident memory per sidecar for one small function.

Input: `perf record -e page-faults -d` of sidecars running the ordered build. The kernel maps a
file's pages in 64 KiB blocks around each page touched, so each block faults once: a fault in
.text names the first function that ran in a block. Every such function that is not in the
order file is printed (mangled, as the linker knows it), once, in the order first seen.

  native_faults.py <ferry-proxy> <order file> <perf.data>...
"""
import bisect
import re
import subprocess
import sys


def functions(binary):
    """Sorted (address, name) of the binary's functions, and .text's bounds."""
    syms = []
    nm = subprocess.run(["nm", "-n", "--defined-only", binary], capture_output=True, text=True, check=True)
    for line in nm.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tTwW":
            syms.append((int(parts[0], 16), parts[2]))
    text = None
    sections = subprocess.run(["readelf", "-SW", binary], capture_output=True, text=True, check=True)
    for line in sections.stdout.splitlines():
        m = re.match(r"\s*\[\s*\d+\]\s+\.text\s+\S+\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)", line)
        if m:
            start = int(m.group(1), 16)
            text = (start, start + int(m.group(2), 16))
    if text is None:
        sys.exit(f"{binary}: no .text section")
    return syms, text


def faults(perf_data):
    """Faulting addresses, in order, and the address perf gives `_start` (the load offset)."""
    out = subprocess.run(
        ["perf", "script", "-f", "-i", perf_data, "-F", "addr,ip,sym"],
        capture_output=True, text=True, check=True,
    ).stdout
    addrs, start = [], None
    for line in out.splitlines():
        parts = line.split()
        if not parts:
            continue
        addr = int(parts[0], 16)
        addrs.append(addr)
        # The first fault of a process is its entry point: `addr ip sym` with sym `_start`.
        if start is None and "_start" in parts[1:]:
            start = addr
    return addrs, start


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    binary, order_file = sys.argv[1], sys.argv[2]
    syms, (text_start, text_end) = functions(binary)
    addresses = [a for a, _ in syms]
    entry = next((a for a, n in syms if n == "_start"), None)
    with open(order_file) as f:
        ordered = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    seen = set()
    for perf_data in sys.argv[3:]:
        addrs, start = faults(perf_data)
        if start is None or entry is None:
            print(f"{perf_data}: no fault at _start; cannot place the binary", file=sys.stderr)
            continue
        base = start - entry
        for addr in addrs:
            rel = addr - base
            if not text_start <= rel < text_end:
                continue
            i = bisect.bisect_right(addresses, rel) - 1
            name = syms[i][1]
            if name not in ordered and name not in seen:
                seen.add(name)
                print(name)


if __name__ == "__main__":
    main()
