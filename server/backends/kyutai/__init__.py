"""Kyutai's moshi-server: streaming speech to text and text to speech over WebSockets."""
