"""Code that both the API and the worker use: settings, Redis keys, the job model."""
