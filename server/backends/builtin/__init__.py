"""The stand-in when no language model is configured (``--llm none``)."""
