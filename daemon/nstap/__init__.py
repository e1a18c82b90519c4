"""nstap: watches the network of every container on a host, and catches the packets when it goes wrong."""

__version__ = "0.1.0"
