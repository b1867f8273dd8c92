"""MQTT: sensor readings in, the daemon's outputs out.

Modules:
- `payload`: the payload grammar (topics, JSON forms, limits, reject reasons); no paho.
- `client`: the paho client's lifecycle (TCP or TLS), the broker link's state, the manual PUBACKs, and
  publishing on `edge/<device.id>/...`.
- `credentials`: the password and key files read at start, the TLS context, how a TLS failure is worded,
  and `validate-config`'s check of who can read a secret.
- `writer`: the batch-commit-ack writer thread (inbox, store commit, disk-full state, held readings).
- `ingestor`: the `Ingestor` the daemon builds, a connection and its writer started and stopped together.
"""
