"""Per-namespace handles and the netlink/procfs readers that use them."""
