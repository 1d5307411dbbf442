"""OpenFlamingo-9B v1 (openflamingo/OpenFlamingo-9B, deprecated): open_clip ViT-L/14 + LLaMA-7B
(32 layers, 4096 wide, 32 heads of 128, SwiGLU 11008, rotary, RMSNorm eps 1e-6, untied
embeddings), a GATED XATTN-DENSE block before every 4th LM layer (layers 3, 7, ..., 31: 8 blocks).

The shared OpenFlamingo choices are `config_defaults.openflamingo_config`'s. Vocabulary: LLaMA's
32,000 SentencePiece ids are the frozen rows, then `<|endofchunk|>`, `<image>`, `<PAD>`.

    python -m flamingo_jax.params --config=configs/openflamingo_9b_v1.py
"""

from flamingo_jax import config_defaults


def get_config():
    config = config_defaults.openflamingo_config("openflamingo-9b-v1", every=4, lm_dim=4096)
    config.model.decoder.update(
        vocab_size=32000, dim=4096, num_layers=32, num_heads=32, head_dim=128, ffw_hidden=11008, ffw="swiglu",
        positions="rotary", rope_theta=10000.0, norm="rms", norm_eps=1e-6, tie_embeddings=False, max_len=2048)
    return config
