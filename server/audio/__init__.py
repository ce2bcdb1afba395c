"""Audio inside the server: the sample rate and pcm16 helpers (``pcm``), Ogg Opus in
and out (``opus``), sample-rate conversion (``resampling``)."""
