"""Tiny Flamingo: trains and evaluates end to end on 2 CPU cores in minutes.

Same architecture as the paper's models (NFNet, Perceiver Resampler, GATED
XATTN-DENSE, Chinchilla-style decoder), scaled down; fp32 throughout.
"""

from flamingo_jax import config_defaults


def get_config():
    config = config_defaults.base()
    config.name = "tiny"
    m = config.model
    m.vision.encoder = "nfnet"
    m.vision.nfnet.variant = "tiny"
    m.vision.image_size = 64
    m.vision.num_frames = 8
    m.resampler.update(num_layers=2, dim=64, num_heads=4, head_dim=16, num_latents=16)
    m.xattn.update(every=2, num_heads=4, head_dim=16)
    m.decoder.update(vocab_size=512, dim=64, num_layers=4, num_heads=4, head_dim=16, max_len=128,
                     ffw="gelu", positions="relative", tie_embeddings=True)
    m.dtype = "float32"
    m.frozen_param_dtype = "float32"
    m.trainable_param_dtype = "float32"
    return config
