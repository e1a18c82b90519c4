"""The local HTTP API and the /metrics endpoint."""
