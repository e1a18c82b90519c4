"""DNS per container, from the kernel: a tc program on every watched namespace's interfaces."""
