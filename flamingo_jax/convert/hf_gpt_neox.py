"""Hugging Face `GPTNeoXForCausalLM` (Pythia, RedPajama-INCITE, GPT-NeoX-20B) -> models/decoder.py.

    gpt_neox.embed_in                       embedding
    gpt_neox.layers.L.*                     layers/* (stacked, layer L)
        input_layernorm                         attention_norm (LayerNorm with bias)
        attention.query_key_value               attention/{query,key,value}: the fused rows are laid
                                                out per head, [heads, (q, k, v), head_dim]
        attention.dense                         attention/out
        post_attention_layernorm                ffw_norm
        mlp.dense_h_to_4h, mlp.dense_4h_to_h    ffw/wi, ffw/wo
    gpt_neox.final_layer_norm               final_norm
    embed_out                               unembedding (untied unless tie_word_embeddings)

Rotary embeddings rotate the first `rotary_pct` of each head ("rotate half" on
those dims, as models/decoder.py does); `use_parallel_residual` adds attention
and MLP to the same input (x + attn(ln1(x)) + mlp(ln2(x))).
"""

from __future__ import annotations

from typing import Any

from flamingo_jax.convert import transforms as t
from flamingo_jax.convert.errors import ConversionError
from flamingo_jax.convert.families import DecoderArchitecture, hf_value
from flamingo_jax.convert.hf_llama import rope_scaling
from flamingo_jax.convert.mapping import Rule, Table, torch_dense, torch_layer_norm
from flamingo_jax.convert.sources import TensorSource
from flamingo_jax.models.config import DecoderConfig

FORMAT = "gpt_neox"
EMBEDDING = "gpt_neox.embed_in.weight"  # its rows are the vocabulary
ARCHITECTURES = ("GPTNeoXForCausalLM", "gpt_neox")
# GPTNeoXConfig's defaults: `save_pretrained` writes only the fields that differ from them.
HF_DEFAULTS = dict(vocab_size=50432, hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
                   intermediate_size=24576, hidden_act="gelu", rotary_pct=0.25, rotary_emb_base=10000,
                   max_position_embeddings=2048, layer_norm_eps=1e-5, tie_word_embeddings=False,
                   use_parallel_residual=True, rope_scaling=None, attention_bias=True)
# HF `hidden_act` -> our feed-forward activation ('gelu' is torch's erf GELU there).
HF_ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_fast": "gelu", "gelu_pytorch_tanh": "gelu"}


def table(d: DecoderConfig, description: str) -> Table:
    layers = tuple(range(d.num_layers))
    layer = "gpt_neox.layers.{layer}"
    heads = d.num_heads
    rules = [Rule("embedding", EMBEDDING)]
    rules += torch_layer_norm("layers/attention_norm", f"{layer}.input_layernorm", layers)
    rules += torch_layer_norm("layers/ffw_norm", f"{layer}.post_attention_layernorm", layers)
    rules += torch_layer_norm("final_norm", "gpt_neox.final_layer_norm")
    for part, ours in enumerate(("query", "key", "value")):
        fused = f"{layer}.attention.query_key_value"
        rules.append(Rule(f"layers/attention/{ours}/kernel", f"{fused}.weight", t.heads_interleaved(part, heads),
                          layers))
        if d.attention_bias:
            rules.append(Rule(f"layers/attention/{ours}/bias", f"{fused}.bias", t.heads_interleaved(part, heads),
                              layers))
    out = f"{layer}.attention.dense"
    rules.append(Rule("layers/attention/out/kernel", f"{out}.weight", t.heads_in(heads), layers))
    if d.attention_bias:
        rules.append(Rule("layers/attention/out/bias", f"{out}.bias", layers=layers))
    rules += torch_dense("layers/ffw/wi", f"{layer}.mlp.dense_h_to_4h", layers)
    rules += torch_dense("layers/ffw/wo", f"{layer}.mlp.dense_4h_to_h", layers)
    # Buffers older checkpoints saved: the causal mask, its fill value, rotary frequencies.
    ignored = [r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)"]
    if d.tie_embeddings:
        ignored.append(r"embed_out\.weight")
    else:
        rules.append(Rule("unembedding", "embed_out.weight", t.torch_linear))
    return Table(tuple(rules), ignored=tuple(ignored), description=description)


def read_architecture(source: TensorSource, config: dict[str, Any]) -> DecoderArchitecture:
    path = source.path
    c = {**HF_DEFAULTS, **config}
    get = lambda name, kind=int: hf_value(c, name, None, path, kind)
    activation = HF_ACTIVATIONS.get(c.get("hidden_act"))
    if activation is None:
        raise ConversionError(f"{path}: config.json's hidden_act {c.get('hidden_act')!r} has no counterpart here; "
                              f"supported: {sorted(HF_ACTIVATIONS)}.")
    dim, heads = get("hidden_size"), get("num_attention_heads")
    if dim % heads:
        raise ConversionError(f"{path}: hidden_size {dim} is not a multiple of num_attention_heads {heads}.")
    theta = c.get("rope_theta", c.get("rotary_emb_base"))
    decoder = DecoderConfig(
        vocab_size=get("vocab_size"), dim=dim, num_layers=get("num_hidden_layers"), num_heads=heads,
        head_dim=dim // heads, ffw_hidden=get("intermediate_size"), ffw=activation, positions="rotary",
        rope_theta=float(theta), rotary_fraction=get("rotary_pct", float),
        rope_scaling=rope_scaling(c.get("rope_scaling"), path), max_len=get("max_position_embeddings"),
        tie_embeddings=get("tie_word_embeddings", bool), norm="layer", norm_bias=True,
        norm_eps=get("layer_norm_eps", float), attention_bias=get("attention_bias", bool), ffw_bias=True,
        parallel_residual=get("use_parallel_residual", bool))
    description = (f"dim {dim}, {decoder.num_layers} layers, {heads} heads x {decoder.head_dim} "
                   f"(rotary on {decoder.rotary_fraction:g}), MLP {decoder.ffw_hidden} ({activation}), vocab "
                   f"{decoder.vocab_size}, {'parallel' if decoder.parallel_residual else 'sequential'} residual, "
                   f"{'tied' if decoder.tie_embeddings else 'untied'} embeddings")
    return DecoderArchitecture(decoder, table(decoder, description))
