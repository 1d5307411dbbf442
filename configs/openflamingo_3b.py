"""OpenFlamingo-3B (openflamingo/OpenFlamingo-3B-vitl-mpt1b): open_clip ViT-L/14 + MPT-1B
(mpt-1b-redpajama-200b: 24 layers, 2048 wide, 16 heads of 128, ALiBi, LayerNorm without bias,
no biases, tied embeddings), a GATED XATTN-DENSE block before every LM layer (24 blocks).

The shared OpenFlamingo choices are `config_defaults.openflamingo_config`'s. Vocabulary: the
GPT-NeoX tokenizer's 50,277 ids are the frozen rows; OpenFlamingo resizes the embedding to
them plus `<|endofchunk|>`, `<image>`, `<PAD>` (our 3 new tokens, in that order).

    python -m flamingo_jax.params --config=configs/openflamingo_3b.py
"""

from flamingo_jax import config_defaults


def get_config():
    config = config_defaults.openflamingo_config("openflamingo-3b", every=1, lm_dim=2048)
    config.model.decoder.update(
        vocab_size=50277, dim=2048, num_layers=24, num_heads=16, head_dim=128, ffw_hidden=4 * 2048,
        ffw="gelu_exact", positions="alibi", alibi_max_bias=8.0, norm="layer", norm_bias=False, norm_eps=1e-5,
        attention_bias=False, ffw_bias=False, tie_embeddings=True, max_len=2048)
    return config
