"""Flamingo on converted public backbones: a Llama-3.2-1B-shaped decoder + CLIP ViT-L/14.

In the paper's recipe (Table 4's Resampler, GATED XATTN-DENSE blocks, training
hyperparameters from config_defaults) with a frozen LLaMA-family LM and OpenAI's
CLIP ViT-L/14 at 224 px as the vision encoder. xattn blocks sit before every 4th
of the 16 LM layers (4 blocks of width 2048, 16 heads x 128), as the 9B does.

The shapes are those the converters print for the public checkpoints, so a
converted pair loads as it is:

    python -m flamingo_jax.convert decoder --from=<Llama-3.2-1B dir> --out=/ckpt/llama \
        --tokenizer=<Llama-3.2-1B dir>/tokenizer.json
    python -m flamingo_jax.convert vision --from=<open_clip ViT-L-14 openai .bin> --format=open_clip \
        --num_heads=16 --activation=quick_gelu --out=/ckpt/clip
    python -m flamingo_jax.train --config=configs/llama_clip.py --config.backbones.decoder=/ckpt/llama \
        --config.backbones.vision=/ckpt/clip --config.data.tokenizer=<dir>/tokenizer.json ...

The Hugging Face tokenizer adds <EOC> and <image> after its 128,256 tokens: two
new tokens with trainable rows (num_new_tokens=2). The encoder returns open_clip's
(OpenFlamingo's) ln_post-normalised patch tokens; a HF CLIP conversion prints
--config.model.vision.vit.norm_output=False instead.
"""

from flamingo_jax import config_defaults
from flamingo_jax.convert.families import CLIP_MEAN, CLIP_STD


def get_config():
    config = config_defaults.base()
    config.name = "llama-clip"
    m = config.model
    m.vision.update(encoder="vit", image_size=224, num_frames=8)
    m.vision.vit.update(width=1024, num_layers=24, num_heads=16, patch_size=14, mlp_ratio=4.0,
                        activation="quick_gelu", norm_eps=1e-5, norm_output=True)
    m.resampler.update(num_layers=6, dim=1536, num_heads=16, head_dim=128, num_latents=64)
    m.xattn.update(every=4, num_heads=16, head_dim=128, ffw_hidden=4 * 2048)
    m.decoder.update(vocab_size=128256, dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                     ffw_hidden=8192, ffw="swiglu", positions="rotary", rope_theta=500000.0, max_len=131072,
                     tie_embeddings=True, norm="rms", norm_eps=1e-5)
    m.decoder.rope_scaling.update(kind="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_len=8192)
    m.num_new_tokens = 2  # <EOC>, <image> after the HF tokenizer's vocabulary
    m.remat_policy = "full"
    config.data.image_size = 224
    config.data.image_mean = CLIP_MEAN
    config.data.image_std = CLIP_STD
    config.mesh.update(data=-1, fsdp=4, tensor=1)
    config.train.microbatches = 4
    return config
