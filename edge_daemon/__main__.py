"""`python -m edge_daemon`: the same command line as the `edge-daemon` script."""

from __future__ import annotations

import sys

from edge_daemon.cli import main

if __name__ == "__main__":
    sys.exit(main())
