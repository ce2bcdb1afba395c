"""A conversation without I/O of its own: turn-taking, the history, the person's side
(listening) and the character's (replies), and the session's set of characters."""
