"""Flamingo-9B (paper Table 4): NFNet-F6, Resampler 6/1536/16, 10 xattn blocks of
width 4096 (before every 4th of the LM's 40 layers), frozen 7B-class Chinchilla LM
(40 layers, 4096 wide, 32 heads).

FFW widths: Table 4 and Table 5 cannot both hold with 4·D everywhere for the 9B
(40 layers of width 4096 with a 4·D GeLU FFW alone are 8.0B, not 7.1B; ten 4·D
xattn blocks are 1.8B, not 1.6B). We keep Table 4's depths, widths and heads and
set the FFW widths so Table 5's counts hold: LM 11008 (2.69·D), xattn 14336 (3.5·D).

Sharding: data parallel + FSDP over 16 chips (a v4-32 slice; more chips add data
parallelism), full remat and 4 micro-batches (BENCHMARKS.md, AOT section).
"""

from flamingo_jax import config_defaults


def get_config():
    config = config_defaults.paper_config("flamingo-9b")
    m = config.model
    m.xattn.update(every=4, num_heads=32, head_dim=128, ffw_hidden=14336)
    m.decoder.update(vocab_size=32000, dim=4096, num_layers=40, num_heads=32, head_dim=128,
                     ffw_hidden=11008, ffw="gelu", positions="relative", tie_embeddings=True, max_len=2048)
    m.remat_policy = "full"
    config.mesh.update(data=-1, fsdp=16, tensor=1)
    config.train.microbatches = 4
    # config.data.datasets lists the mixture (data/mixture.py); a prepared TFDS builder is one entry, e.g.
    #   dict(name="wit", kind="tfds", tfds_builder="wit_kaggle/train_with_extended_features",
    #        tfds_split="train_with_extended_features", tfds_data_dir="gs://my-bucket/tfds",
    #        tfds_fields=dict(image="image", text="caption_reference_description"),
    #        batch_size=512, weight=0.2, max_len=32)
    return config
