"""OpenFlamingo-4B (openflamingo/OpenFlamingo-4B-vitl-rpj3b): open_clip ViT-L/14 +
RedPajama-INCITE-Base-3B-v1 (GPT-NeoX: 32 layers, 2560 wide, 32 heads of 80, full rotary,
sequential residual, LayerNorm with bias, biased projections, untied embeddings), a GATED
XATTN-DENSE block before every 2nd LM layer (layers 1, 3, ..., 31: 16 blocks).

The shared OpenFlamingo choices are `config_defaults.openflamingo_config`'s. Vocabulary: the
GPT-NeoX tokenizer's 50,277 ids are the frozen rows, then `<|endofchunk|>`, `<image>`, `<PAD>`.

    python -m flamingo_jax.params --config=configs/openflamingo_4b.py
"""

from flamingo_jax import config_defaults


def get_config():
    config = config_defaults.openflamingo_config("openflamingo-4b", every=2, lm_dim=2560)
    config.model.decoder.update(
        vocab_size=50277, dim=2560, num_layers=32, num_heads=32, head_dim=80, ffw_hidden=4 * 2560,
        ffw="gelu_exact", positions="rotary", rotary_fraction=1.0, rope_theta=10000.0, norm="layer",
        norm_bias=True, norm_eps=1e-5, attention_bias=True, ffw_bias=True, parallel_residual=False,
        tie_embeddings=False, max_len=2048)
    return config
