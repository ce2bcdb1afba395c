"""Troupe's server: one aiohttp process, one sandboxed character set per session."""
