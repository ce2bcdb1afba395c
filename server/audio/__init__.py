"""Audio formats: Ogg Opus in and out, sample-rate conversion."""
