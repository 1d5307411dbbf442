"""Flamingo-3B (paper Table 4): NFNet-F6, Resampler 6/1536/16, xattn before every
LM layer (24 blocks of width 2048), frozen 1.4B Chinchilla-style LM (24 layers,
2048 wide, 16 heads).

Parameter counts (`python -m flamingo_jax.params --config=configs/3b.py`) match
Table 5 within 5%; see README for the table and the choices behind it.

Sharding: data parallel + FSDP (weights, gradients and optimizer state split 4 ways,
the chips of one TPU v4 host; more chips add data parallelism). With full remat and
8 micro-batches the paper's ablation batch fits one v4-8 (BENCHMARKS.md, AOT section).
"""

from flamingo_jax import config_defaults


def get_config():
    config = config_defaults.paper_config("flamingo-3b")
    m = config.model
    m.xattn.update(every=1, num_heads=16, head_dim=128, ffw_hidden=4 * 2048)
    m.decoder.update(vocab_size=32000, dim=2048, num_layers=24, num_heads=16, head_dim=128,
                     ffw_hidden=4 * 2048, ffw="gelu", positions="relative", tie_embeddings=True, max_len=2048)
    m.remat_policy = "full"
    config.mesh.update(data=-1, fsdp=4, tensor=1)
    config.train.microbatches = 8
    # config.data.datasets lists the mixture (data/mixture.py); a prepared TFDS builder is one entry, e.g.
    #   dict(name="laion", kind="tfds", tfds_builder="laion400m/images", tfds_split="train[:99%]",
    #        tfds_data_dir="gs://my-bucket/tfds", tfds_fields=dict(image="image", text="caption"),
    #        batch_size=512, weight=0.2, max_len=32)
    return config
