"""edge-daemon: a continual-learning daemon for edge devices."""

__version__ = "0.1.0"
