"""Flamingo-80B (paper Table 4): NFNet-F6, Resampler 6/1536/16, 12 xattn blocks of
width 8192 (before every 7th of Chinchilla-70B's 80 layers: 11 groups of 7 and a
tail of 3), frozen Chinchilla-70B (80 layers, 8192 wide, 64 heads, kv size 128).

The LM's FFW is 4·D and with Transformer-XL relative positions (a d x d projection
per layer) it has Chinchilla's 70B parameters. The xattn FFW is 5·D: with 4·D the
12 blocks hold 8.4B, not Table 5's 10B.
"""

from flamingo_jax import config_defaults


def get_config():
    config = config_defaults.paper_config("flamingo-80b")
    m = config.model
    m.xattn.update(every=7, num_heads=64, head_dim=128, ffw_hidden=5 * 8192)
    m.decoder.update(vocab_size=32000, dim=8192, num_layers=80, num_heads=64, head_dim=128,
                     ffw_hidden=4 * 8192, ffw="gelu", positions="relative", tie_embeddings=True, max_len=2048)
    m.remat_policy = "full"
    return config
