"""What router and shard both use (TLS files, ports, flags, logging, benchmark statistics); imports only proto, the standard library and third parties."""
