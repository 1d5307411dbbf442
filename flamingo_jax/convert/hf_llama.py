"""Hugging Face `LlamaForCausalLM` / `MistralForCausalLM` (Llama 2/3, Mistral) -> models/decoder.py.

    model.embed_tokens                      embedding
    model.layers.L.*                        layers/* (stacked, layer L)
        input_layernorm                         attention_norm (RMSNorm)
        self_attn.{q,k,v}_proj                  attention/{query,key,value} (per head; k, v: the KV heads)
        self_attn.o_proj                        attention/out
        post_attention_layernorm                ffw_norm
        mlp.gate_proj, up_proj, down_proj       ffw/wi (activated), ffw/wg (gate), ffw/wo
    model.norm                              final_norm
    lm_head                                 unembedding (absent or ignored when tied)

Rotary convention: Hugging Face's checkpoints already hold q/k in the "rotate
half" layout (their conversion script permuted Meta's interleaved pairs), which
is the layout models/decoder.py applies, so q and k are only reshaped. The
architecture comes from config.json: RMSNorm eps, rope_theta and rope_scaling
('linear' or Llama 3's 'llama3'), grouped-query heads, head_dim, biases
(`attention_bias`, `mlp_bias`: Qwen-2-like variants) and tied embeddings.
"""

from __future__ import annotations

from typing import Any

from flamingo_jax.convert import transforms as t
from flamingo_jax.convert.errors import ConversionError
from flamingo_jax.convert.families import DecoderArchitecture, hf_value
from flamingo_jax.convert.mapping import Rule, Table
from flamingo_jax.convert.sources import TensorSource
from flamingo_jax.models.config import DecoderConfig, RopeScaling

FORMAT = "llama"
EMBEDDING = "model.embed_tokens.weight"  # its rows are the vocabulary
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "llama", "mistral")
# LlamaConfig's defaults (MistralConfig's differ only where noted in `_defaults`).
HF_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048,
                   rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=None,
                   attention_bias=False, mlp_bias=False, head_dim=None)
MISTRAL_DEFAULTS = dict(intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                        rms_norm_eps=1e-6, sliding_window=4096)


def _defaults(config: dict[str, Any]) -> dict[str, Any]:
    mistral = config.get("model_type") == "mistral"
    return {**HF_DEFAULTS, **(MISTRAL_DEFAULTS if mistral else {}), **config}


def rope_scaling(value: Any, path: str) -> RopeScaling:
    """config.json's `rope_scaling` -> ours: None/'default', 'linear' or 'llama3'."""
    if value is None:
        return RopeScaling()
    kind = value.get("rope_type", value.get("type"))
    if kind in (None, "default"):
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(value["factor"]))
    if kind == "llama3":
        try:
            return RopeScaling(kind="llama3", factor=float(value["factor"]),
                               low_freq_factor=float(value["low_freq_factor"]),
                               high_freq_factor=float(value["high_freq_factor"]),
                               original_max_len=int(value["original_max_position_embeddings"]))
        except KeyError as error:
            raise ConversionError(f"{path}: config.json's llama3 rope_scaling lacks {error}.") from error
    raise ConversionError(f"{path}: config.json's rope_scaling type {kind!r} is not supported (supported: "
                          "'default', 'linear', 'llama3').")


def table(d: DecoderConfig, description: str) -> Table:
    layers = tuple(range(d.num_layers))
    kv_heads = d.num_kv_heads or d.num_heads
    layer = "model.layers.{layer}"
    heads = {"query": (d.num_heads, "q_proj"), "key": (kv_heads, "k_proj"), "value": (kv_heads, "v_proj")}
    rules = [Rule("embedding", EMBEDDING),
             Rule("layers/attention_norm/scale", f"{layer}.input_layernorm.weight", layers=layers),
             Rule("layers/ffw_norm/scale", f"{layer}.post_attention_layernorm.weight", layers=layers),
             Rule("final_norm/scale", "model.norm.weight")]
    for ours, (count, theirs) in heads.items():
        rules.append(Rule(f"layers/attention/{ours}/kernel", f"{layer}.self_attn.{theirs}.weight", t.heads_out(count),
                          layers))
        if d.attention_bias:
            rules.append(Rule(f"layers/attention/{ours}/bias", f"{layer}.self_attn.{theirs}.bias",
                              t.heads_out(count), layers))
    rules.append(Rule("layers/attention/out/kernel", f"{layer}.self_attn.o_proj.weight", t.heads_in(d.num_heads),
                      layers))
    if d.attention_bias:
        rules.append(Rule("layers/attention/out/bias", f"{layer}.self_attn.o_proj.bias", layers=layers))
    for ours, theirs in (("wi", "gate_proj"), ("wg", "up_proj"), ("wo", "down_proj")):
        rules.append(Rule(f"layers/ffw/{ours}/kernel", f"{layer}.mlp.{theirs}.weight", t.torch_linear, layers))
        if d.ffw_bias:
            rules.append(Rule(f"layers/ffw/{ours}/bias", f"{layer}.mlp.{theirs}.bias", layers=layers))
    ignored = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]  # a buffer older checkpoints saved
    if d.tie_embeddings:
        ignored.append(r"lm_head\.weight")  # tied: a copy of the embedding, when saved at all
    else:
        rules.append(Rule("unembedding", "lm_head.weight", t.torch_linear))
    return Table(tuple(rules), ignored=tuple(ignored), description=description)


def read_architecture(source: TensorSource, config: dict[str, Any]) -> DecoderArchitecture:
    path = source.path
    c = _defaults(config)
    get = lambda name, kind=int: hf_value(c, name, None, path, kind)
    if c.get("hidden_act") != "silu":
        raise ConversionError(f"{path}: config.json's hidden_act {c.get('hidden_act')!r} is not supported for LLaMA "
                              "(its SwiGLU uses 'silu').")
    dim, heads = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim") or dim // heads
    kv_heads = get("num_key_value_heads") or heads
    decoder = DecoderConfig(
        vocab_size=get("vocab_size"), dim=dim, num_layers=get("num_hidden_layers"), num_heads=heads,
        num_kv_heads=kv_heads if kv_heads != heads else 0, head_dim=head_dim, ffw_hidden=get("intermediate_size"),
        ffw="swiglu", positions="rotary", rope_theta=get("rope_theta", float),
        rope_scaling=rope_scaling(c.get("rope_scaling"), path), max_len=get("max_position_embeddings"),
        tie_embeddings=get("tie_word_embeddings", bool), norm="rms", norm_eps=get("rms_norm_eps", float),
        attention_bias=get("attention_bias", bool), ffw_bias=get("mlp_bias", bool))
    assumptions = []
    if c.get("model_type") == "mistral" and c.get("sliding_window"):
        assumptions.append(f"Mistral's sliding window ({c['sliding_window']} tokens) is not applied: attention is "
                           "over the whole context, identical for sequences up to that length.")
    description = (f"dim {dim}, {decoder.num_layers} layers, {heads} heads "
                   f"({kv_heads} KV) x {head_dim}, SwiGLU {decoder.ffw_hidden}, vocab {decoder.vocab_size}, "
                   f"rope theta {decoder.rope_theta:g} ({decoder.rope_scaling.kind} scaling), "
                   f"{'tied' if decoder.tie_embeddings else 'untied'} embeddings")
    return DecoderArchitecture(decoder, table(decoder, description), tuple(assumptions))
