"""The control socket: a Unix stream server that dispatches to the handlers it is given, and the client.

One JSON object per line each way. Request `{"cmd": "<name>", ...}`; reply `{"ok": true, ...}`
or `{"ok": false, "error": "<message>"}`. Errors become replies only here; a bad client never stops the server.

Modules:
- `protocol`: the wire format (one JSON object per line, size limits), argument checks, and the
  dispatch of one request line to a handler table.
- `socketfile`: the socket file's safety: its directory, the lock, publishing it 0660 before it
  is visible, stale-socket replacement, and removing it only while it is ours.
- `server`: `ControlServer` on `socketserver`: peer credentials for mutating commands, client
  limits and timeouts, start/stop.
- `client`: `request()`, one request and its reply, as the CLI sends it.
"""
