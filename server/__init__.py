"""The OpenAI-compatible HTTP server: app, protocol, streaming, limits, metrics, CLI."""
