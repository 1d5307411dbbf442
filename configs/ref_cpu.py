"""REF-CPU: the configuration OpenFlamingo was benchmarked with on a 2-core CPU
(../shared/peers/openflamingo/README.md), for side-by-side benchmarks.

LLaMA-style decoder (d 512, 8 layers, 8 heads, SwiGLU 1536, vocab 32,000, untied),
CLIP-style ViT (width 384, 6 layers, 6 heads, patch 16, 224 px -> 196 tokens),
Resampler 6 layers, 64 latents, 8 heads x 64, xattn before every decoder layer.
As in OpenFlamingo, the Resampler works at the ViT's width (384, 8 heads x 64)
on the ViT's patch tokens, and the xattn keys/values are projected from 384.
fp32 everywhere, as the peer's benchmark. Rematerialisation 'dots': the backward
keeps every matmul output and recomputes the elementwise work (norms, softmax,
activations) from them, so no matmul runs twice while the step's temporaries
drop from 2.1 to 1.3 GiB, and the step is no slower (bench/train_step.py
--remat_policy=none compares).
"""

from flamingo_jax import config_defaults


def get_config():
    config = config_defaults.base()
    config.name = "ref-cpu"
    m = config.model
    m.vision.update(encoder="vit", image_size=224, num_frames=1)
    m.vision.vit.update(width=384, num_layers=6, num_heads=6, patch_size=16)
    m.resampler.update(num_layers=6, dim=384, num_heads=8, head_dim=64, num_latents=64)
    m.xattn.update(every=1, num_heads=8, head_dim=64, ffw_hidden=4 * 512)
    m.decoder.update(vocab_size=32000, dim=512, num_layers=8, num_heads=8, head_dim=64, ffw_hidden=1536,
                     ffw="swiglu", positions="rotary", tie_embeddings=False, max_len=2048)
    m.num_new_tokens = 1
    m.dtype = "float32"
    m.frozen_param_dtype = "float32"
    m.trainable_param_dtype = "float32"
    m.remat_policy = "dots"
    return config
