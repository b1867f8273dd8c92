"""Test helper process: holds a commanded amount of touched anonymous memory.

Reads one command per line on stdin: `hold <MB>` (grow or shrink to exactly
that much), `quit`. After each command it replies `held <MB> rss <MB>` once
the pages are really resident. Standard library only, so its own footprint
stays small (~10 MB).
"""

from __future__ import annotations

import mmap
import os
import sys

MB = 1024 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE")
_ONE_MB = b"\x01" * MB


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE / MB


class Hog:
    """Blocks of anonymous mmap: unlike malloc'd buffers, unmapping one returns it to the OS at once."""

    def __init__(self) -> None:
        self.blocks: list[mmap.mmap] = []

    @property
    def held_mb(self) -> int:
        return sum(len(block) for block in self.blocks) // MB

    def hold(self, target_mb: int) -> None:
        """Grow or shrink to `target_mb`, never dipping below the target on the way.

        Shrinking unmaps whole blocks, so the remainder is mapped first: a
        watcher must not see a transient low it would react to.
        """
        keep = len(self.blocks)
        while keep and self._sum_mb(keep) > target_mb:
            keep -= 1
        missing = target_mb - self._sum_mb(keep)
        if missing > 0:
            block = mmap.mmap(-1, missing * MB)
            # Touch every page: an untouched mapping costs no RSS.
            for _ in range(missing):
                block.write(_ONE_MB)
        while len(self.blocks) > keep:
            self.blocks.pop().close()
        if missing > 0:
            self.blocks.append(block)

    def _sum_mb(self, count: int) -> int:
        return sum(len(block) for block in self.blocks[:count]) // MB


def main() -> int:
    hog = Hog()
    if len(sys.argv) > 1:
        hog.hold(int(sys.argv[1]))
    print(f"held {hog.held_mb} rss {rss_mb():.1f}", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            break
        if words[0] == "hold" and len(words) == 2:
            hog.hold(int(words[1]))
            print(f"held {hog.held_mb} rss {rss_mb():.1f}", flush=True)
        else:
            print(f"error unknown command {line.strip()!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
