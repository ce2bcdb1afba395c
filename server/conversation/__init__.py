"""The conversation, apart from the WebSocket: the sans-I/O core (``dialogue``: events
in, ``commands`` out; ``turns``, ``history``, ``settings``, the ``events`` model), the
person's side (``hearing``, ``listening``), the character's (``speaking``, ``replies``),
and the session's set of characters (``characters``, ``directories``, ``voices``)."""
