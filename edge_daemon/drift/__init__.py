"""Drift detection over the inputs and the model's residuals: windowed
comparisons against a reference (reference.py: PSI of a day of inputs
against the training data, a day's mean |residual| against a baseline; the
daemon's default), a CUSUM that sees an abrupt residual shift in minutes
beside that window (cusum.py), streaming detectors (ADWIN, Page-Hinkley,
KSWIN; one per module), the drift state of one channel (channel.py: its detectors,
counts and status) and DriftMonitor (monitor.py), which feeds the channels and keeps the
drift status the daemon reports and alerts on.

Implemented here rather than depending on river: `import river.drift` costs
~1.9 s and 111 MB peak RSS (it loads scipy.stats for KSWIN) against 0.3 s and
32 MB for this package (numpy alone: 0.25 s, 31 MB), measured on the 2-core
dev machine. The three algorithms are ~300 lines, and they give exactly
river 0.26's detection indices (tests/test_drift.py checks this when river is
installed). Cost per update, pure Python: Page-Hinkley 0.6 us, ADWIN 5.8 us,
KSWIN 85 us (random sampling as river does it); DriftMonitor with ADWIN
~15 us per channel per grid step (three detectors and the residual level).
"""

from __future__ import annotations

from edge_daemon.drift.adwin import ADWIN
from edge_daemon.drift.base import DriftDetector
from edge_daemon.drift.channel import make_detector
from edge_daemon.drift.cusum import CUSUM
from edge_daemon.drift.kswin import KSWIN
from edge_daemon.drift.monitor import DriftEvent, DriftMonitor
from edge_daemon.drift.page_hinkley import PageHinkley

__all__ = ["ADWIN", "CUSUM", "KSWIN", "DriftDetector", "DriftEvent", "DriftMonitor", "PageHinkley", "make_detector"]
