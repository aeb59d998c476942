"""The worker: pulls jobs from Redis, runs them through an engine, publishes tokens."""
