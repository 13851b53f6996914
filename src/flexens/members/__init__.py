"""Member networks: factory, training module, on-disk registry."""
