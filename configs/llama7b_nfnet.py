"""Flamingo on a LLaMA-7B-shaped decoder and NFNet-F6: the 9B's recipe with a public LM.

The paper's vision side (NFNet-F6 at 320 px, 8 frames, the 6-layer 1536-wide
Resampler; `config_defaults.paper_config`) and xattn blocks before every 4th of
the LM's 32 layers (8 blocks of width 4096, 32 heads x 128, 4·D GeLU FFW). The
frozen LM has Llama 2 7B's shapes (4096 wide, 32 layers and heads, SwiGLU 11008,
RoPE, untied 32,000-token embeddings), as `python -m flamingo_jax.convert decoder`
prints them for the Hugging Face checkpoint:

    python -m flamingo_jax.convert decoder --from=<Llama-2-7b-hf dir> --out=/ckpt/llama7b \
        --tokenizer=<dir>/tokenizer.json
    python -m flamingo_jax.convert vision --from=<timm dm_nfnet_f6 .safetensors> --format=timm_nfnet \
        --image_size=320 --out=/ckpt/f6      # DeepMind's ImageNet NFNet-F6 (timm numerics)

num_new_tokens=2 covers a tokenizer.json (<EOC> and <image> both new); with
LLaMA's SentencePiece tokenizer.model only <EOC> is new and the second row is unused.

Sharding as the 9B: data parallel + FSDP over 16 chips, full remat, 4 micro-batches.
"""

from flamingo_jax import config_defaults


def get_config():
    config = config_defaults.paper_config("llama7b-nfnet")
    m = config.model
    m.xattn.update(every=4, num_heads=32, head_dim=128, ffw_hidden=4 * 4096)
    m.decoder.update(vocab_size=32000, dim=4096, num_layers=32, num_heads=32, head_dim=128, ffw_hidden=11008,
                     ffw="swiglu", positions="rotary", rope_theta=10000.0, max_len=4096, tie_embeddings=False,
                     norm="rms", norm_eps=1e-5)
    m.num_new_tokens = 2
    m.remat_policy = "full"
    config.mesh.update(data=-1, fsdp=16, tensor=1)
    config.train.microbatches = 4
    return config
