"""Troupe's bundled characters: one character per ``*.py`` file; ``resources/`` holds helpers."""
