"""The HTTP side: OpenAI-compatible routes over the Redis job queue. No torch here."""
