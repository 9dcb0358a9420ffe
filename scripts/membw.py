"""Memory bandwidth one decode-like stream gets: alone, or beside a copy of itself on another core.

Decoding is memory-bound (every weight is read once per token), so this is the ceiling
for any overlap of pipeline stages on one host. Runs a matrix-vector product over a
512 MB fp32 matrix, the access pattern of a decode step.

    taskset -c 0 python scripts/membw.py                          # one core alone
    taskset -c 1 python scripts/membw.py & taskset -c 0 python scripts/membw.py   # two at once
    taskset -c 0,1 python scripts/membw.py --threads 2            # one stream, two threads
"""

import argparse
import time

import torch
import torch.nn.functional as F


def stream_bandwidth(repeats: int = 10) -> float:
    """GB/s of a matrix-vector product over a 512 MB fp32 matrix, on torch's current threads."""
    w = torch.randn(32768, 4096)  # 512 MB: far beyond any cache
    x = torch.randn(1, 4096)
    F.linear(x, w)
    t0 = time.perf_counter()
    for _ in range(repeats):
        F.linear(x, w)
    seconds = (time.perf_counter() - t0) / repeats
    return w.numel() * 4 / seconds / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{stream_bandwidth(args.repeats):.1f} GB/s ({args.threads} thread(s))")


if __name__ == "__main__":
    main()
