"""UNet2DConditionModel for SD1.x, SD2.x and SDXL, built from a diffusers ``unet/config.json`` dict.

Public calls take and return NCHW like diffusers; inside everything is NHWC. Options the project does not
implement are refused with a ValueError naming the option, never silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from dpojax.models import layers
from dpojax.models.blocks import (
    CrossAttentionSpec,
    DownBlock,
    ResnetBlock2D,
    TimestepEmbedding,
    Timesteps,
    UpBlock,
    check_activation,
)
from dpojax.models.frozen_config import FrozenConfig
from dpojax.weights.pretrained import PretrainedMixin

# diffusers 0.42 defaults for every option this module reads.
UNET_DEFAULTS: dict[str, Any] = {
    "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "only_cross_attention": False, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1.0, "act_fn": "silu", "norm_num_groups": 32,
    "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "attention_head_dim": 8, "use_linear_projection": False,
    "addition_embed_type": None, "addition_time_embed_dim": None, "upcast_attention": False,
    "time_embedding_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
}
# Options whose supported values are listed; anything else is refused.
UNET_RESTRICTED: dict[str, tuple] = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn", None),
    "addition_embed_type": (None, "text_time"),
    "num_attention_heads": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "resnet_time_scale_shift": ("default",),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
    "dropout": (0.0,),
}
DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")


def _unsupported(option: str, value: Any, supported: Sequence) -> ValueError:
    return ValueError(f"unet config: {option}={value!r} is not supported "
                      f"(supported: {', '.join(map(repr, supported))})")


def _per_block(cfg: Mapping, key: str, n: int) -> list:
    """A per-block option given as one value or a list of ``n``."""
    value = cfg[key]
    if not isinstance(value, list | tuple):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"unet config: {key} has {len(value)} entries but there are {n} down blocks")
    return list(value)


def _per_layer(value: int | Sequence[int], num_layers: int, what: str) -> tuple[int, ...]:
    """Transformer depth of each resnet of a block, from one int or a per-resnet list."""
    if isinstance(value, int):
        return (value,) * num_layers
    if len(value) != num_layers:
        raise ValueError(f"unet config: {what} has {len(value)} entries but the block has "
                         f"{num_layers} layers")
    return tuple(value)


def resolve_unet_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Fill diffusers' defaults, refuse what is unsupported, and expand per-block options to lists."""
    cfg = {**UNET_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for option, supported in UNET_RESTRICTED.items():
        if cfg.get(option, supported[0]) not in supported:
            raise _unsupported(option, cfg[option], supported)
    check_activation(cfg["act_fn"], "unet config")
    if cfg["norm_num_groups"] is None:
        raise ValueError("unet config: norm_num_groups=None is not supported (supported: an integer)")
    only_cross = cfg["only_cross_attention"]
    if any(only_cross) if isinstance(only_cross, list | tuple) else only_cross:
        raise _unsupported("only_cross_attention", only_cross, (False,))
    for key, types, supported in (("down_block_types", cfg["down_block_types"], DOWN_BLOCK_TYPES),
                                  ("up_block_types", cfg["up_block_types"], UP_BLOCK_TYPES)):
        for i, block_type in enumerate(types):
            if block_type not in supported:
                raise _unsupported(f"{key}[{i}]", block_type, supported)
    if cfg["addition_embed_type"] == "text_time":
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if cfg[key] is None:
                raise ValueError(f"unet config: addition_embed_type='text_time' needs {key}")

    n = len(cfg["down_block_types"])
    for key in ("up_block_types", "block_out_channels"):
        if len(cfg[key]) != n:
            raise ValueError(f"unet config: {key} has {len(cfg[key])} entries but there are {n} down blocks")
    for key in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
                "attention_head_dim"):
        cfg[key] = _per_block(cfg, key, n)
    # diffusers quirk: with num_attention_heads unset, attention_head_dim holds the number of heads.
    cfg["heads"] = cfg.pop("attention_head_dim")
    reverse = cfg["reverse_transformer_layers_per_block"]
    cfg["up_transformer_layers"] = list(reversed(cfg["transformer_layers_per_block"])) if reverse is None \
        else list(reverse)
    return cfg


class UNetMidBlock2DCrossAttn(nnx.Module):
    """Resnet, then (transformer, resnet) pairs at the lowest resolution."""

    def __init__(self, channels: int, *, temb_channels: int, groups: int, eps: float,
                 output_scale_factor: float, cross_attention: CrossAttentionSpec, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32, remat: layers.Remat = False):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.remat = remat
        num_layers = len(cross_attention.layers)
        self.resnets = nnx.List([
            ResnetBlock2D(channels, channels, temb_channels=temb_channels, groups=groups, eps=eps,
                          output_scale_factor=output_scale_factor, **kw)
            for _ in range(num_layers + 1)])
        self.attentions = nnx.List([cross_attention.build(i, channels, groups, **kw)
                                    for i in range(num_layers)])

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        x = layers.call_layer(self.resnets[0], self.remat, x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = layers.call_layer(resnet, self.remat, attn(x, context), temb)
        return x


class UNet2DConditionModel(PretrainedMixin, nnx.Module):
    """The conditional denoiser; attribute paths equal diffusers' state-dict keys."""

    weights_layout = "diffusers"

    def __init__(self, config: Mapping[str, Any], *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
                 remat: layers.Remat | Literal["block"] = False):
        """``remat``: recompute each resnet and transformer layer in the backward pass (see
        :func:`layers.call_layer`), or with ``"block"`` each down, mid and up block as a whole (fewer saved
        inputs, more live at once while a block's backward runs)."""
        cfg = resolve_unet_config(config)
        self.config = FrozenConfig(config)
        self.remat_blocks = remat == "block"
        remat = False if self.remat_blocks else remat
        self.center_input_sample = cfg["center_input_sample"]
        self.addition_embed_type = cfg["addition_embed_type"]
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        channels = list(cfg["block_out_channels"])
        n = len(channels)
        groups, eps = cfg["norm_num_groups"], cfg["norm_eps"]

        def cross_attention(heads: int, depth, num_layers: int, cross_dim: int,
                            what: str) -> CrossAttentionSpec:
            return CrossAttentionSpec(heads, _per_layer(depth, num_layers, what), cross_dim,
                                      cfg["use_linear_projection"], cfg["upcast_attention"], remat)

        self.conv_in = layers.conv2d(cfg["in_channels"], channels[0], cfg["conv_in_kernel"],
                                     padding=(cfg["conv_in_kernel"] - 1) // 2, **kw)
        time_dim = cfg["time_embedding_dim"] or 4 * channels[0]
        self.time_proj = Timesteps(channels[0], cfg["flip_sin_to_cos"], cfg["freq_shift"])
        self.time_embedding = TimestepEmbedding(channels[0], time_dim, **kw)
        if self.addition_embed_type == "text_time":
            self.add_time_proj = Timesteps(cfg["addition_time_embed_dim"], cfg["flip_sin_to_cos"],
                                           cfg["freq_shift"])
            self.add_embedding = TimestepEmbedding(cfg["projection_class_embeddings_input_dim"], time_dim,
                                                   **kw)

        down_blocks = []
        for i, block_type in enumerate(cfg["down_block_types"]):
            num_layers = cfg["layers_per_block"][i]
            spec = (cross_attention(cfg["heads"][i], cfg["transformer_layers_per_block"][i], num_layers,
                                    cfg["cross_attention_dim"][i], f"transformer_layers_per_block[{i}]")
                    if block_type == "CrossAttnDownBlock2D" else None)
            down_blocks.append(DownBlock(
                channels[max(i - 1, 0)], channels[i], num_layers=num_layers, temb_channels=time_dim,
                groups=groups, eps=eps, add_downsample=i < n - 1,
                downsample_padding=cfg["downsample_padding"], cross_attention=spec, remat=remat, **kw))
        self.down_blocks = nnx.List(down_blocks)

        mid_depth = cfg["transformer_layers_per_block"][-1]
        mid_depth = mid_depth if isinstance(mid_depth, int) else mid_depth[0]
        self.mid_block = None if cfg["mid_block_type"] is None else UNetMidBlock2DCrossAttn(
            channels[-1], temb_channels=time_dim, groups=groups, eps=eps,
            output_scale_factor=cfg["mid_block_scale_factor"],
            cross_attention=cross_attention(cfg["heads"][-1], mid_depth, 1, cfg["cross_attention_dim"][-1],
                                            "mid block transformer layers"), remat=remat, **kw)

        reversed_channels = channels[::-1]
        up_blocks = []
        for i, block_type in enumerate(cfg["up_block_types"]):
            out_ch = reversed_channels[i]
            skip_in = reversed_channels[min(i + 1, n - 1)]
            num_layers = cfg["layers_per_block"][n - 1 - i] + 1
            spec = (cross_attention(cfg["heads"][n - 1 - i], cfg["up_transformer_layers"][i], num_layers,
                                    cfg["cross_attention_dim"][n - 1 - i], f"up block {i} transformer layers")
                    if block_type == "CrossAttnUpBlock2D" else None)
            up_blocks.append(UpBlock(
                reversed_channels[max(i - 1, 0)], out_ch, num_layers=num_layers,
                skip_channels=[out_ch] * (num_layers - 1) + [skip_in], temb_channels=time_dim, groups=groups,
                eps=eps, add_upsample=i < n - 1, cross_attention=spec, remat=remat, **kw))
        self.up_blocks = nnx.List(up_blocks)

        self.conv_norm_out = layers.group_norm(channels[0], groups, eps, **kw)
        self.conv_out = layers.conv2d(channels[0], cfg["out_channels"], cfg["conv_out_kernel"],
                                      padding=(cfg["conv_out_kernel"] - 1) // 2, **kw)

    def _condition(self, timestep, batch: int,
                   added_cond_kwargs: Mapping[str, jax.Array] | None) -> jax.Array:
        """Time embedding plus, for SDXL, the pooled-text and size/crop (``time_ids``) embedding."""
        timesteps = jnp.broadcast_to(jnp.reshape(jnp.asarray(timestep), (-1,)), (batch,))
        emb = self.time_embedding(self.time_proj(timesteps))
        if self.addition_embed_type == "text_time":
            missing = [k for k in ("text_embeds", "time_ids") if k not in (added_cond_kwargs or {})]
            if missing:
                raise ValueError(f"unet: addition_embed_type='text_time' needs added_cond_kwargs {missing}")
            text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
            time_embeds = self.add_time_proj(jnp.reshape(time_ids, (-1,))).reshape(batch, -1)
            emb = emb + self.add_embedding(jnp.concatenate([text_embeds, time_embeds], axis=-1))
        return emb

    def __call__(self, sample: jax.Array, timestep, encoder_hidden_states: jax.Array,
                 added_cond_kwargs: Mapping[str, jax.Array] | None = None) -> jax.Array:
        """Predict noise (or v) for NCHW ``sample``; returns NCHW in the sample's dtype."""
        x = jnp.transpose(sample, (0, 2, 3, 1))
        if self.center_input_sample:
            x = 2 * x - 1.0
        temb = self._condition(timestep, x.shape[0], added_cond_kwargs)
        context = encoder_hidden_states

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = layers.call_layer(block, self.remat_blocks, x, temb, context)
            skips.extend(block_skips)
        if self.mid_block is not None:
            x = layers.call_layer(self.mid_block, self.remat_blocks, x, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = tuple(skips[-n:]), skips[:-n]
            # Upsample to the next skip's size: 2x unless the latent size is not a multiple of 2^levels.
            size = tuple(skips[-1].shape[1:3]) if block.upsamplers is not None else None
            x = layers.call_layer(block, self.remat_blocks, x, temb, context, block_skips, upsample_size=size)

        x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
        return jnp.transpose(x, (0, 3, 1, 2)).astype(sample.dtype)
