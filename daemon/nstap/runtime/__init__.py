"""Runtime sources (Docker and Podman endpoints), container records and process-exit watches."""
