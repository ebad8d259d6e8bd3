"""The LAION aesthetic predictor (DDPO/D3PO's "aesthetic" reward): a linear MLP on unit-norm CLIP ViT-L/14 image
embeddings, read from local files the user points to.

The head is https://github.com/christophschuhmann/improved-aesthetic-predictor's ``MLP``: Linear layers
768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout between (inactive at inference) and no nonlinearity. Its
``sac+logos+ava1-l14-linearMSE.pth`` is a PyTorch state dict (``layers.{0,2,4,6,7}.{weight,bias}``); the same keys
in a .safetensors file work too. Neither needs torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dpojax.models import layers
from dpojax.models.clip_vision import CLIPVisionModelWithProjection, clip_preprocess, load_clip_vision
from dpojax.scorers.batched import BatchedScores
from dpojax.weights import naming
from dpojax.weights.torch_pickle import read_weights

HEAD_WIDTHS = (1024, 128, 64, 16, 1)
HEAD_LINEAR_INDICES = (0, 2, 4, 6, 7)  # positions of the Linear layers in the PyTorch nn.Sequential


class AestheticHead(nnx.Module):
    """``layers`` keeps the nn.Sequential indices (None where PyTorch has a Dropout) so the state dict loads by
    name."""

    def __init__(self, embed_dim: int = 768, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        dims = (embed_dim, *HEAD_WIDTHS)
        linears = iter(layers.linear(i, o, rngs=rngs, param_dtype=param_dtype)
                       for i, o in zip(dims, dims[1:], strict=False))
        self.layers = nnx.List([next(linears) if i in HEAD_LINEAR_INDICES else None
                                for i in range(HEAD_LINEAR_INDICES[-1] + 1)])

    def __call__(self, embeds: jax.Array) -> jax.Array:
        for index in HEAD_LINEAR_INDICES:
            embeds = self.layers[index](embeds)
        return embeds[..., 0]


def load_head(path: str | Path) -> AestheticHead:
    state = read_weights(path, "aesthetic head weights")
    first = state.get("layers.0.weight")
    if first is None or np.ndim(first) != 2:
        raise ValueError(f"aesthetic head weights {path} have no 2-d 'layers.0.weight' "
                         f"(keys: {', '.join(sorted(state)[:8])})")
    head = nnx.eval_shape(lambda: AestheticHead(int(first.shape[1]), rngs=nnx.Rngs(0)))
    naming.load_state_dict(head, state, f"aesthetic head {path}")
    return head


def aesthetic_scores(clip: CLIPVisionModelWithProjection, head: AestheticHead, images: jax.Array) -> jax.Array:
    """uint8 (N, H, W, 3) -> (N,) scores: head(CLIP image embedding / its L2 norm), as DDPO's scorer."""
    embeds = clip(clip_preprocess(images, clip.config["image_size"])).image_embeds.astype(jnp.float32)
    return head(embeds / jnp.linalg.norm(embeds, axis=-1, keepdims=True))


class AestheticScorer:
    """A Scorer: runs ``aesthetic_scores`` under jit in fixed-size batches (one compilation per image size), with a
    ``mesh`` split over its batch axes (``dpojax.scorers.batched.BatchedScores``)."""

    def __init__(self, clip: CLIPVisionModelWithProjection, head: AestheticHead, batch_size: int = 16,
                 mesh: Mesh | None = None):
        embed_dim = head.layers[0].in_features
        if clip.visual_projection.out_features != embed_dim:
            raise ValueError(f"aesthetic head takes {embed_dim}-d embeddings, the CLIP model gives "
                             f"{clip.visual_projection.out_features}-d (the LAION head needs CLIP ViT-L/14)")
        self._batches = BatchedScores((clip, head), lambda models, batch: aesthetic_scores(*models, batch["images"]),
                                      batch_size, mesh, "aesthetic scorer")
        self.batch_size = self._batches.batch_size

    @classmethod
    def from_files(cls, clip_model: str | Path, head: str | Path, batch_size: int = 16,
                   mesh: Mesh | None = None) -> AestheticScorer:
        return cls(load_clip_vision(clip_model), load_head(head), batch_size=batch_size, mesh=mesh)

    def __call__(self, images: np.ndarray, prompts: Sequence[str] = ()) -> np.ndarray:
        return self._batches({"images": np.asarray(images)})
