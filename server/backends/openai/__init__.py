"""A language model behind any OpenAI-compatible ``/v1/chat/completions`` server."""
