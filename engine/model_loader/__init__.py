"""Find, fetch and read model checkpoints."""
