"""The one attention function: every implementation the host can run gives the same output as
softmax(scale * q.k + bias, masked) . v written out by hand (fp32, 1e-5), grouped-query heads
included; an implementation the host cannot run fails with a clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models.attention import IMPLEMENTATIONS, attention, attention_over_parts


def reference(q, k, v, bias, mask, scale):
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) * scale + bias
    scores = jnp.where(mask, scores, -jnp.inf)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, axis=-1), v)


def inputs(num_kv_heads):
    keys = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(keys[0], (2, 5, 4, 8))
    k = jax.random.normal(keys[1], (2, 7, num_kv_heads, 8))
    v = jax.random.normal(keys[2], (2, 7, num_kv_heads, 8))
    bias = jax.random.normal(keys[3], (2, 4, 5, 7))
    mask = jax.random.bernoulli(keys[4], 0.7, (2, 1, 5, 7)).at[..., 0].set(True)  # every row sees a key
    return q, k, v, bias, mask


def runnable(implementation):
    return implementation != "cudnn" or jax.default_backend() == "gpu"


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("implementation", [i for i in IMPLEMENTATIONS if runnable(i)])
def test_every_runnable_implementation_equals_attention_written_out(implementation, num_kv_heads):
    q, k, v, bias, mask = inputs(num_kv_heads)
    out = attention(q, k, v, bias=bias, mask=mask, scale=0.3, implementation=implementation)
    np.testing.assert_allclose(out, reference(q, k, v, bias, mask, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_attention_over_parts_equals_attention_over_the_concatenated_keys(num_kv_heads):
    """Keys/values in two parts (a decoding step's cache and its new keys) = the same attention
    over them concatenated."""
    q, k, v, bias, mask = inputs(num_kv_heads)
    out = attention_over_parts(q, (k[:, :4], k[:, 4:]), (v[:, :4], v[:, 4:]), bias=bias, mask=mask, scale=0.3)
    np.testing.assert_allclose(out, reference(q, k, v, bias, mask, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN runs here; the error case is for other hosts")
def test_cudnn_where_it_cannot_run_fails_clearly():
    q, k, v, _, _ = inputs(4)
    with pytest.raises(Exception, match="(?i)cudnn|gpu|cuda"):
        attention(q, k, v, implementation="cudnn")


def test_unknown_implementation_and_mismatched_heads_are_named():
    q, k, v, _, _ = inputs(4)
    with pytest.raises(ValueError, match="'flash' is unknown"):
        attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="4 query heads are not a multiple of 3"):
        attention(q, k[:, :, :3], v[:, :, :3])
