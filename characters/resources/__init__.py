"""Helper data shared by the bundled characters; nothing in here is a character."""
