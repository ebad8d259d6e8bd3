"""CLIP text encoders (transformers' CLIPTextModel and CLIPTextModelWithProjection) in Flax NNX.

transformers 5 dropped its Flax CLIP, and the online D3PO sampler must encode prompts on the accelerator, so
the project owns these. Attribute paths equal transformers 5.23's state-dict keys, which are also the keys its
``save_pretrained`` writes: CLIPTextModel has no ``text_model.`` prefix (4.x files have it; the importer and
transformers 5 accept both), CLIPTextModelWithProjection keeps ``text_model.`` before the shared layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dpojax.models import layers
from dpojax.models.clip_encoder import CLIPEncoder, check_encoder_config
from dpojax.models.frozen_config import FrozenConfig
from dpojax.weights.pretrained import PretrainedMixin


class CLIPTextOutput(NamedTuple):
    """transformers' output fields; ``hidden_states`` (embeddings, then each layer) only when asked."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    text_embeds: jax.Array | None = None


# CLIPTextConfig's defaults in transformers 5.23: a config.json means here exactly what it means there.
CONFIG_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "projection_dim": 512,
                   "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
                   "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 49407}


def _resolved(config: Mapping[str, Any]) -> dict[str, Any]:
    cfg = {**CONFIG_DEFAULTS, **config}
    check_encoder_config(cfg, "text encoder")
    if not isinstance(cfg["eos_token_id"], int):  # pooling needs one id (transformers would fail later)
        raise ValueError(f"text encoder config: eos_token_id={cfg['eos_token_id']!r} must be one integer")
    return cfg


class CLIPEmbeddings(nnx.Module):
    def __init__(self, cfg: dict, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.token_embedding = layers.embedding(cfg["vocab_size"], cfg["hidden_size"], **kw)
        self.position_embedding = layers.embedding(cfg["max_position_embeddings"], cfg["hidden_size"], **kw)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        if input_ids.ndim != 2 or input_ids.shape[1] > self.position_embedding.num_embeddings:
            raise ValueError(f"text encoder: input_ids must be (batch, tokens) with at most "
                             f"{self.position_embedding.num_embeddings} tokens (max_position_embeddings), "
                             f"got shape {input_ids.shape}")
        positions = jnp.arange(input_ids.shape[-1])
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPTextTransformer(nnx.Module):
    """Embeddings, causal encoder and final layer norm; pools the hidden state at the end-of-text token."""

    def __init__(self, cfg: dict, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.eos_token_id = cfg["eos_token_id"]
        self.embeddings = CLIPEmbeddings(cfg, **kw)
        self.encoder = CLIPEncoder(cfg, causal=True, **kw)
        self.final_layer_norm = layers.layer_norm(cfg["hidden_size"], cfg["layer_norm_eps"], **kw)

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               output_hidden_states: bool = False) -> CLIPTextOutput:
        input_ids = jnp.asarray(input_ids)
        mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)[:, None, None, :]
        h = self.embeddings(input_ids)
        hidden_states = [h]
        for layer in self.encoder.layers:
            h = layer(h, mask)
            hidden_states.append(h)
        last = self.final_layer_norm(h)
        # transformers: legacy configs (eos_token_id == 2) take the highest id, others the first EOS token.
        eos_pos = (jnp.argmax(input_ids, axis=-1) if self.eos_token_id == 2
                   else jnp.argmax(input_ids == self.eos_token_id, axis=-1))
        pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]  # per-row: stays on its device
        return CLIPTextOutput(last, pooled, tuple(hidden_states) if output_hidden_states else None)


class CLIPTextModel(PretrainedMixin, CLIPTextTransformer):
    """transformers' CLIPTextModel: ``model(input_ids)`` -> last_hidden_state, pooler_output, hidden_states."""

    weights_layout = "transformers"

    def __init__(self, config: Mapping[str, Any], *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        super().__init__(_resolved(config), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = FrozenConfig(config)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 output_hidden_states: bool = False) -> CLIPTextOutput:
        return self.encode(input_ids, attention_mask, output_hidden_states)


class CLIPTextModelWithProjection(PretrainedMixin, nnx.Module):
    """transformers' CLIPTextModelWithProjection: adds ``text_embeds`` = text_projection(pooled), no bias."""

    weights_layout = "transformers"

    def __init__(self, config: Mapping[str, Any], *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        cfg = _resolved(config)
        self.config = FrozenConfig(config)
        self.text_model = CLIPTextTransformer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.text_projection = layers.linear(cfg["hidden_size"], cfg["projection_dim"], bias=False, rngs=rngs,
                                             dtype=dtype, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 output_hidden_states: bool = False) -> CLIPTextOutput:
        out = self.text_model.encode(input_ids, attention_mask, output_hidden_states)
        return out._replace(text_embeds=self.text_projection(out.pooler_output))
