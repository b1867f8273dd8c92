"""Sample sensor data for edge-daemon: a simulated motor and an MQTT publisher.

`sample_sensors.generate` makes reproducible multichannel motor readings (daily
cycle, thermal lag, spikes, a regime change); `sample_sensors.publish` replays
them over MQTT in the payload forms of the input contract, with a share of
malformed messages. Both also run as `python -m sample_sensors.<module>`.
"""

from __future__ import annotations

# Nothing is re-exported: the function `generate` would shadow the module of the same
# name, and importing the submodules here makes `python -m sample_sensors.<module>` warn.
