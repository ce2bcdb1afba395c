"""The WebSocket edge: the event schema, the dialects, and the session that serves
one connection (receive, dispatch, send)."""
