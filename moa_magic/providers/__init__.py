"""Transport: the one OpenAI-compatible HTTP client and the embedded local model server."""
