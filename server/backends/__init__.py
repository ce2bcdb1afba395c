"""The services a conversation uses: speech to text, a language model, text to speech.
The interfaces live here; ``openai/``, ``kyutai/`` and ``embedded/`` implement them."""
