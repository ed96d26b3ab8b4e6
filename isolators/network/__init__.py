"""Network isolation: per-container network namespaces, our Linux bridge, IPAM, port forwards
(nftables) and egress shaping (tc). `isolator.NetworkIsolator` is the entry point; the rest are
plain mechanisms it composes (netns, bridge, veth, ipam, ports, shaping, state)."""
