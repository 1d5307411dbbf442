"""OpenFlamingo-9B (openflamingo/OpenFlamingo-9B-vitl-mpt7b): open_clip ViT-L/14 + MPT-7B
(32 layers, 4096 wide, 32 heads of 128, ALiBi, LayerNorm without bias, no biases, tied
embeddings), a GATED XATTN-DENSE block before every 4th LM layer (layers 3, 7, ..., 31: 8 blocks).

The shared OpenFlamingo choices are `config_defaults.openflamingo_config`'s. Vocabulary: the
GPT-NeoX tokenizer's 50,277 ids are the frozen rows, then `<|endofchunk|>`, `<image>`, `<PAD>`.

    python -m flamingo_jax.params --config=configs/openflamingo_9b.py
"""

from flamingo_jax import config_defaults


def get_config():
    config = config_defaults.openflamingo_config("openflamingo-9b", every=4, lm_dim=4096)
    config.model.decoder.update(
        vocab_size=50277, dim=4096, num_layers=32, num_heads=32, head_dim=128, ffw_hidden=4 * 4096,
        ffw="gelu_exact", positions="alibi", alibi_max_bias=8.0, norm="layer", norm_bias=False, norm_eps=1e-5,
        attention_bias=False, ffw_bias=False, tie_embeddings=True, max_len=2048)
    return config
