"""Packet captures: tcpdump in a container's namespace, the flight recorder, the capture store."""
