"""eBPF collectors (bcc): kernel drop reasons and retransmitted flows, aggregated in the kernel."""
