"""Flamingo-80B (paper Table 4): NFNet-F6, Resampler 6/1536/16, 12 xattn blocks of
width 8192 (before every 7th of Chinchilla-70B's 80 layers: 11 groups of 7 and a
tail of 3), frozen Chinchilla-70B (80 layers, 8192 wide, 64 heads, kv size 128).

The LM's FFW is 4·D and with Transformer-XL relative positions (a d x d projection
per layer) it has Chinchilla's 70B parameters. The xattn FFW is 5·D: with 4·D the
12 blocks hold 8.4B, not Table 5's 10B.

Sharding presets (`--config=configs/80b.py:<preset>`):
  tensor (default)  the paper's: 16-way Megatron-style tensor parallelism of the LM,
                    xattn blocks and embeddings ('heads', 'mlp', 'vocab' over 'tensor'),
                    data parallelism over the rest, optimizer state split over 'data'
                    too (ZeRO-1), the NFNet's weights replicated and its frames split over
                    'tensor' as well ('vision_batch': the tensor ranks share its forward);
  fsdp              FSDP x tensor: the same 16-way tensor parallelism inside 2-way FSDP
                    groups (weights, gradients and optimizer state split 32 ways), data
                    parallelism over the rest.
With the paper's ablation batch, full remat and 16 micro-batches, compiled for TPU v4
(BENCHMARKS.md, AOT section): 'fsdp' fits a v4-64 (32 chips, 25.3 GiB per chip), the
smallest v4 slice that holds the model; 'tensor' needs a v4-128 (26.1 GiB). On the paper's
1,536 chips (a v4-3072: v4 names count TensorCores; data axis 96) 'tensor' fits with the
batch x3 (`--batch_multiplier=3`, which 96 divides) and `--config.train.microbatches=1`
(24.0 GiB per chip; the NFNet executes 1.02x its analytic FLOPs, not 16x: M3W's 40 frames
per data shard are split 8 ways by frame and 2 by row, `models.flamingo.encode_frames`).
Micro-batches must divide each dataset's batch per data shard: set
`--config.train.microbatches` for bigger slices.
"""

from flamingo_jax import config_defaults

PRESETS = {
    "tensor": dict(mesh=dict(data=-1, fsdp=1, tensor=16), optimizer_sharding="zero1"),
    "fsdp": dict(mesh=dict(data=-1, fsdp=2, tensor=16), optimizer_sharding="params"),
}


def get_config(preset: str = "tensor"):
    if preset not in PRESETS:
        raise ValueError(f"configs/80b.py:{preset}: unknown sharding preset; use one of {sorted(PRESETS)}.")
    config = config_defaults.paper_config("flamingo-80b")
    config.mesh.update(**PRESETS[preset]["mesh"])
    config.optimizer_sharding = PRESETS[preset]["optimizer_sharding"]
    config.train.microbatches = 16
    m = config.model
    m.xattn.update(every=7, num_heads=64, head_dim=128, ffw_hidden=5 * 8192)
    m.decoder.update(vocab_size=32000, dim=8192, num_layers=80, num_heads=64, head_dim=128,
                     ffw_hidden=4 * 8192, ffw="gelu", positions="relative", tie_embeddings=True, max_len=2048)
    m.remat_policy = "full"
    # config.data.datasets lists the mixture (data/mixture.py); a prepared TFDS builder is one entry, e.g.
    # COCO's Karpathy train split (one of an image's five captions drawn per pass):
    #   dict(name="coco", kind="tfds", tfds_builder="coco_captions", tfds_split="train+restval",
    #        tfds_data_dir="gs://my-bucket/tfds", tfds_fields=dict(image="image", text="captions/text"),
    #        batch_size=256, weight=0.2, max_len=32)
    return config
