"""NAT rules, conntrack and the containers' own firewalls: readers, parsers and the verdicts on them."""
