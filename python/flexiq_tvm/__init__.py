"""flexiq-tvm."""
