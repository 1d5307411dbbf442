"""Training: state, optimizer, loss, sharding, checkpoints, metrics and the loop."""
