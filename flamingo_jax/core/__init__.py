"""What training, inference, conversion and pod tooling share: the model's parts
(graph + trainable + frozen), logical-axis sharding on meshes, orbax checkpoints,
references to frozen backbone checkpoints, and analytic FLOPs."""
