"""Text-to-image with the JAX models: prompt encoding, DDIM sampling in one jitted ``lax.scan``, VAE decoding.

Prompt encoding follows diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` exactly, so
embeddings (and therefore training) match the PyTorch originals. The sampling loop is a pure function of a
``predict(x, t)`` callable (:func:`ddim_loop`), so the D3PO trainer can run it inside its own jitted step with
the policy UNet; it records the whole trajectory and per-step log-probs when asked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from transformers import CLIPTokenizer

from dpojax import schedule as sched
from dpojax.diffusers_folder import PipelineFolder, read_pipeline_folder, tokenize
from dpojax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from dpojax.models.unet import UNet2DConditionModel
from dpojax.models.vae import AutoencoderKL
from dpojax.weights.atomic import atomic_file


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: identity, not value, equality
class TextConditioning:
    """What the UNet is conditioned on: token embeddings, plus SDXL's pooled text embedding and size ids."""

    hidden_states: jax.Array  # (B, 77, D)
    text_embeds: jax.Array | None = None  # (B, P), SDXL only
    # (B, 6), SDXL only: original (h, w), crop top-left (0, 0), target (h, w)
    time_ids: jax.Array | None = None

    def added_cond_kwargs(self) -> dict[str, jax.Array] | None:
        if self.text_embeds is None:
            return None
        return {"text_embeds": self.text_embeds, "time_ids": self.time_ids}


def interleave_rows(first, second):
    """Rows ``[f0, s0, f1, s1, ...]`` of two trees of equal-shape arrays (the inverse of
    :func:`deinterleave_rows`). Unlike concatenation this keeps each device's rows of a batch-sharded input on
    that device, so the doubled guidance batch needs no collective."""
    return jax.tree.map(lambda a, b: jnp.stack([a, b], axis=1).reshape((-1, *a.shape[1:])), first, second)


def deinterleave_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(even rows, odd rows) of ``x``."""
    pairs = x.reshape((-1, 2, *x.shape[1:]))
    return pairs[:, 0], pairs[:, 1]


def sdxl_time_ids(height: int, width: int, batch: int) -> np.ndarray:
    """SDXL's micro-conditioning: original size, crop top-left (0, 0), target size; the image is uncropped."""
    return np.tile(np.array([[height, width, 0, 0, height, width]], np.float32), (batch, 1))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: identity, not value, equality
class Trajectory:
    """A DDIM sampling run, batch-major: what D3PO/DDPO need to re-score every step later."""

    latents: jax.Array  # (B, T+1, C, h, w): x_T, ..., x_0 (fp32)
    log_probs: jax.Array  # (B, T): log p(x_{t'} | x_t) per step, per-dim mean (NaN when eta == 0)
    timesteps: jax.Array  # (T,) int32: t of each step
    prev_timesteps: jax.Array  # (T,) int32: t' of each step (< 0: past the end)


Predictor = Callable[[jax.Array, jax.Array], jax.Array]


def guided_predictor(unet: nnx.Module, cond: TextConditioning, uncond: TextConditioning | None,
                     guidance_scale) -> Predictor:
    """``predict(x, t)`` for the DDIM loop: one UNet call, on a batch of 2B when guidance is on.

    ``t`` is one timestep for the batch or one per sample, shape ``(B,)`` (D3PO re-scores pairs at their
    own timesteps)."""
    if uncond is None:
        return lambda x, t: unet(x, t, cond.hidden_states, added_cond_kwargs=cond.added_cond_kwargs())
    both = interleave_rows(uncond, cond)

    def predict(x: jax.Array, t: jax.Array) -> jax.Array:
        t = t if jnp.ndim(t) == 0 else jnp.repeat(t, 2)
        out = unet(jnp.repeat(x, 2, axis=0), t, both.hidden_states, added_cond_kwargs=both.added_cond_kwargs())
        out_uncond, out_cond = deinterleave_rows(out)
        return sched.classifier_free_guidance(out_uncond, out_cond, guidance_scale)

    return predict


def ddim_loop(predict: Predictor, schedule: sched.NoiseSchedule, latents: jax.Array, timesteps: jax.Array,
              prev_timesteps: jax.Array, eta, key: jax.Array, *, return_trajectory: bool = False
              ) -> tuple[jax.Array, Trajectory | None]:
    """DDIM from ``latents`` = x_T over ``timesteps`` under ``lax.scan``; returns (x_0, trajectory or None).

    Step i draws its noise from ``fold_in(key, i)``, so two runs from the same x_T with different keys differ
    only through the per-step noise (D3PO's pair construction).
    """
    timesteps, prev_timesteps = jnp.asarray(timesteps, jnp.int32), jnp.asarray(prev_timesteps, jnp.int32)
    latents = jnp.asarray(latents, jnp.float32)
    step_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(timesteps.shape[0]))

    def step(x, inputs):
        t, t_prev, step_key = inputs
        x_prev, log_prob = sched.ddim_step(schedule, predict(x, t), t, t_prev, x, eta, key=step_key)
        return x_prev, ((x_prev, log_prob) if return_trajectory else None)

    x0, recorded = jax.lax.scan(step, latents, (timesteps, prev_timesteps, step_keys))
    if not return_trajectory:
        return x0, None
    states, log_probs = recorded
    path = jnp.concatenate([latents[None], states]).swapaxes(0, 1)
    return x0, Trajectory(path, log_probs.T, timesteps, prev_timesteps)


@nnx.jit(static_argnames=("return_trajectory",))
def _sample_latents(unet, schedule, cond, uncond, latents, timesteps, prev_timesteps, guidance_scale, eta,
                    key, return_trajectory):
    predict = guided_predictor(unet, cond, uncond, guidance_scale)
    return ddim_loop(predict, schedule, latents, timesteps, prev_timesteps, eta, key,
                     return_trajectory=return_trajectory)


@nnx.jit
def decode_to_uint8(vae: AutoencoderKL, latents: jax.Array) -> jax.Array:
    z = latents / vae.scaling_factor
    if vae.shift_factor is not None:
        z = z + vae.shift_factor
    pixels = vae.decode(z).astype(jnp.float32)  # NCHW in [-1, 1]
    unit = jnp.clip(pixels / 2 + 0.5, 0.0, 1.0)
    return jnp.round(unit * 255).astype(jnp.uint8).transpose(0, 2, 3, 1)


def encode_text(text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection | None,
                input_ids: jax.Array, input_ids_2: jax.Array | None) -> TextConditioning:
    """Token ids to conditioning as diffusers' pipelines do: SD1.x/2.x the last hidden state; SDXL (two
    encoders) the penultimate hidden states of both, concatenated, and encoder 2's projected pooled output.
    SDXL's ``time_ids`` depend on the image, not the text: the caller adds them."""
    if text_encoder_2 is None:
        return TextConditioning(text_encoder(input_ids).last_hidden_state)
    out = text_encoder(input_ids, output_hidden_states=True)
    out_2 = text_encoder_2(input_ids_2, output_hidden_states=True)
    hidden = jnp.concatenate([out.hidden_states[-2], out_2.hidden_states[-2]], axis=-1)
    return TextConditioning(hidden, out_2.text_embeds)


_encode_text = nnx.jit(encode_text)


def _as_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    return prompts


@dataclasses.dataclass
class Pipeline:
    """The components of a diffusers SD1.x/2.x or SDXL folder, as JAX models, with sampling on top."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    schedule: sched.NoiseSchedule
    is_sdxl: bool = False
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    # diffusers' SDXL default: the empty negative prompt is all-zero embeddings rather than encoded "".
    force_zeros_for_empty_prompt: bool = False

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, dtype=jnp.float32, compute_dtype=None) -> Pipeline:
        """Load every component of a diffusers pipeline folder (``dtype``: parameter dtype)."""
        return cls.from_folder(read_pipeline_folder(folder), dtype=dtype, compute_dtype=compute_dtype)

    @classmethod
    def from_folder(cls, folder: PipelineFolder, *, dtype=jnp.float32, compute_dtype=None, **models) -> Pipeline:
        """The pipeline of ``folder``: the models given in ``models`` (e.g. a trained ``unet``), the others
        loaded from the folder."""
        kw = dict(dtype=dtype, compute_dtype=compute_dtype)
        loaders = {"unet": lambda: UNet2DConditionModel.from_pretrained(folder.path, subfolder="unet", **kw),
                   "vae": lambda: AutoencoderKL.from_pretrained(folder.path, subfolder="vae", **kw),
                   "text_encoder": lambda: CLIPTextModel.from_pretrained(folder.path, subfolder="text_encoder", **kw),
                   "text_encoder_2": lambda: (CLIPTextModelWithProjection.from_pretrained(
                       folder.path, subfolder="text_encoder_2", **kw) if folder.is_sdxl else None)}
        built = {name: models[name] if name in models else load() for name, load in loaders.items()}
        return cls(**built, tokenizer=folder.tokenizer, tokenizer_2=folder.tokenizer_2, schedule=folder.schedule,
                   is_sdxl=folder.is_sdxl, force_zeros_for_empty_prompt=folder.force_zeros_for_empty_prompt)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config["block_out_channels"]) - 1)

    def default_size(self) -> tuple[int, int]:
        """The (height, width) in pixels the UNet was configured for."""
        size = self.unet.config["sample_size"] * self.vae_scale_factor
        return size, size

    def _resolve_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        default_h, default_w = self.default_size()
        height, width = height or default_h, width or default_w
        f = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % f:
                raise ValueError(f"{name}={value} must be a positive multiple of the VAE scale factor {f}")
        return height, width

    def encode_prompt(self, prompts: str | Sequence[str], *, height: int | None = None,
                      width: int | None = None) -> TextConditioning:
        """Encode as diffusers does (SD: last hidden state; SDXL: penultimate states, pooled, time ids)."""
        prompts = _as_prompt_list(prompts)
        ids = jnp.asarray(tokenize(self.tokenizer, prompts))
        if not self.is_sdxl:
            return _encode_text(self.text_encoder, None, ids, None)
        cond = _encode_text(self.text_encoder, self.text_encoder_2, ids,
                            jnp.asarray(tokenize(self.tokenizer_2, prompts)))
        height, width = self._resolve_size(height, width)
        return dataclasses.replace(cond, time_ids=jnp.asarray(sdxl_time_ids(height, width, len(prompts))))

    def encode_negative(self, cond: TextConditioning, *, height: int | None = None,
                        width: int | None = None) -> TextConditioning:
        """The unconditional input for guidance, shaped like ``cond``: the empty prompt, or zeros (SDXL)."""
        if self.force_zeros_for_empty_prompt:
            return dataclasses.replace(cond, hidden_states=jnp.zeros_like(cond.hidden_states),
                                       text_embeds=jnp.zeros_like(cond.text_embeds))
        return self.encode_prompt([""] * cond.hidden_states.shape[0], height=height, width=width)

    def sample_latents(self, prompts: str | Sequence[str], *, num_steps: int = 50,
                       guidance_scale: float = 5.0, eta: float = 0.0, seed: int = 0,
                       height: int | None = None, width: int | None = None,
                       latents: jax.Array | None = None, return_trajectory: bool = False
                       ) -> tuple[jax.Array, Trajectory | None]:
        """DDIM from x_T (``latents``, or drawn from ``seed``) to x_0; guidance is on when scale > 1."""
        prompts = _as_prompt_list(prompts)
        height, width = self._resolve_size(height, width)
        cond = self.encode_prompt(prompts, height=height, width=width)
        uncond = self.encode_negative(cond, height=height, width=width) if guidance_scale > 1 else None
        init_key, loop_key = jax.random.split(jax.random.key(seed))
        shape = (len(prompts), self.unet.config["in_channels"], height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if latents is None:
            latents = jax.random.normal(init_key, shape, jnp.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        return _sample_latents(self.unet, self.schedule, cond, uncond, latents,
                               sched.ddim_timesteps(self.schedule, num_steps),
                               sched.ddim_prev_timesteps(self.schedule, num_steps),
                               jnp.float32(guidance_scale), jnp.float32(eta), loop_key, return_trajectory)

    def decode(self, latents: jax.Array) -> np.ndarray:
        """Latents (in the UNet's scale) to uint8 NHWC images."""
        return np.asarray(decode_to_uint8(self.vae, latents))

    def sample(self, prompts: str | Sequence[str], *, return_trajectory: bool = False, **kwargs
               ) -> np.ndarray | tuple[np.ndarray, Trajectory]:
        """Generate uint8 NHWC images, one per prompt; keywords as in :meth:`sample_latents`."""
        x0, trajectory = self.sample_latents(prompts, return_trajectory=return_trajectory, **kwargs)
        images = self.decode(x0)
        return (images, trajectory) if return_trajectory else images


def write_png(image: np.ndarray, path: str | Path) -> Path:
    """Write one uint8 HWC image; the file appears whole or not at all (a temp file renamed into place)."""
    path = Path(path)
    with atomic_file(path, "wb") as f:
        Image.fromarray(np.asarray(image)).save(f, format="PNG")
    return path


def save_images(images: np.ndarray, out_dir: str | Path, prefix: str) -> list[Path]:
    """Write uint8 NHWC images as ``{prefix}_{i:04d}.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [write_png(image, out_dir / f"{prefix}_{i:04d}.png") for i, image in enumerate(np.asarray(images))]
