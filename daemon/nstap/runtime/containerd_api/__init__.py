"""containerd's gRPC API, generated from its own .proto files: ``make containerd-api`` (deploy/gen-containerd-api.sh).

Everything below this package except this file is generated; do not edit it by hand.
"""
