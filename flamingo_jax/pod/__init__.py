"""Pod-scale tooling: TPU slices described on any host, and ahead-of-time
compilation of the real train step for them (memory and FLOPs per chip)."""
