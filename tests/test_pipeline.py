"""The JAX text-to-image pipeline against diffusers' PyTorch pipelines on tiny random folders."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from helpers import rel_err
from PIL import Image

from dpojax import schedule as S
from dpojax.pipeline import Pipeline, ddim_loop, guided_predictor, save_images
from dpojax.tiny import SCHEDULER

PROMPTS = ["a red cube on a table", "an astronaut riding a horse, watercolor"]
SIZE = 32  # pixels; latents are 16x16 with the tiny VAE
STEPS = 3


@pytest.fixture(scope="module")
def sdxl_folder(tiny_sdxl):
    return tiny_sdxl


@pytest.fixture(scope="module")
def sdxl(sdxl_folder):
    return Pipeline.from_pretrained(sdxl_folder)


@pytest.fixture(scope="module")
def torch_sdxl(sdxl_folder):
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, torch_dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe.to("cpu")


def _torch_sdxl_embeddings(torch_pipe):
    with torch.no_grad():
        return [t.numpy() for t in torch_pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                             do_classifier_free_guidance=True)]


@pytest.mark.parametrize("force_zeros", [True, False])
def test_sdxl_prompt_encoding_matches_diffusers(sdxl, torch_sdxl, force_zeros):
    torch_sdxl.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    ours = dataclasses.replace(sdxl, force_zeros_for_empty_prompt=force_zeros)
    embeds, neg_embeds, pooled, neg_pooled = _torch_sdxl_embeddings(torch_sdxl)
    cond = ours.encode_prompt(PROMPTS, height=SIZE, width=2 * SIZE)
    uncond = ours.encode_negative(cond, height=SIZE, width=2 * SIZE)
    assert cond.hidden_states.shape == embeds.shape and cond.text_embeds.shape == pooled.shape
    for got, expected in ((cond.hidden_states, embeds), (cond.text_embeds, pooled),
                          (uncond.hidden_states, neg_embeds), (uncond.text_embeds, neg_pooled)):
        assert rel_err(got, expected) <= 1e-4
    if force_zeros:
        assert not np.any(neg_embeds) and not np.any(np.asarray(uncond.hidden_states))
    time_ids = torch_sdxl._get_add_time_ids((SIZE, 2 * SIZE), (0, 0), (SIZE, 2 * SIZE), dtype=torch.float32,
                                            text_encoder_projection_dim=pooled.shape[-1])
    np.testing.assert_array_equal(cond.time_ids, np.repeat(time_ids.numpy(), len(PROMPTS), axis=0))
    np.testing.assert_array_equal(uncond.time_ids, cond.time_ids)


def test_sd15_prompt_encoding_matches_diffusers(tiny_sd15):
    folder = tiny_sd15
    ours = Pipeline.from_pretrained(folder)
    assert not ours.is_sdxl and not ours.force_zeros_for_empty_prompt
    theirs = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    with torch.no_grad():
        embeds, neg_embeds = (t.numpy() for t in theirs.encode_prompt(PROMPTS, "cpu", 1, True))
    cond = ours.encode_prompt(PROMPTS)
    assert cond.text_embeds is None and cond.added_cond_kwargs() is None
    assert rel_err(cond.hidden_states, embeds) <= 1e-4
    assert rel_err(ours.encode_negative(cond).hidden_states, neg_embeds) <= 1e-4


def test_sdxl_sampling_matches_diffusers_ddim(sdxl, torch_sdxl):
    """Deterministic DDIM (eta=0) with guidance from the same x_T: latents and decoded images agree."""
    torch_sdxl.register_to_config(force_zeros_for_empty_prompt=True)
    x_T = np.asarray(jax.random.normal(jax.random.key(7), (2, 4, SIZE // 2, SIZE // 2)))
    kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=5.0, eta=0.0)
    with torch.no_grad():
        theirs = torch_sdxl(PROMPTS, latents=torch.from_numpy(x_T.copy()), output_type="latent", **kwargs)
        their_images = torch_sdxl(PROMPTS, latents=torch.from_numpy(x_T.copy()), output_type="np", **kwargs)
    x0, _ = sdxl.sample_latents(PROMPTS, num_steps=STEPS, guidance_scale=5.0, eta=0.0, height=SIZE,
                                width=SIZE, latents=x_T)
    assert rel_err(x0, theirs.images.numpy()) <= 1e-4
    images = sdxl.decode(x0)
    expected = np.round(their_images.images * 255)
    assert images.dtype == np.uint8 and images.shape == expected.shape
    assert np.abs(images.astype(np.int32) - expected).max() <= 1


def test_sample_shapes_and_seeds(sdxl):
    def run(seed):
        return sdxl.sample(PROMPTS, num_steps=STEPS, guidance_scale=5.0, eta=1.0, seed=seed, height=SIZE,
                           width=SIZE)

    first, again, other = run(0), run(0), run(1)
    assert first.dtype == np.uint8 and first.shape == (len(PROMPTS), SIZE, SIZE, 3)
    np.testing.assert_array_equal(first, again)
    assert np.any(first != other)


def test_trajectory_rescoring_reproduces_log_probs(sdxl):
    """The recorded path and log-probs are those of the steps taken: re-scoring each step gives them back."""
    x0, traj = sdxl.sample_latents(PROMPTS, num_steps=STEPS, guidance_scale=5.0, eta=1.0, seed=3, height=SIZE,
                                   width=SIZE, return_trajectory=True)
    b = len(PROMPTS)
    assert traj.latents.shape == (b, STEPS + 1, 4, SIZE // 2, SIZE // 2)
    assert traj.log_probs.shape == (b, STEPS)
    np.testing.assert_array_equal(traj.timesteps, S.ddim_timesteps(sdxl.schedule, STEPS))
    np.testing.assert_array_equal(traj.latents[:, -1], x0)
    assert np.all(np.isfinite(traj.log_probs))

    cond = sdxl.encode_prompt(PROMPTS, height=SIZE, width=SIZE)
    predict = guided_predictor(sdxl.unet, cond, sdxl.encode_negative(cond), 5.0)
    for j in range(STEPS):
        t, t_prev = traj.timesteps[j], traj.prev_timesteps[j]
        x_t, x_next = traj.latents[:, j], traj.latents[:, j + 1]  # before and after step j
        _, log_prob = S.ddim_step(sdxl.schedule, predict(x_t, t), t, t_prev, x_t, 1.0, prev_sample=x_next)
        np.testing.assert_allclose(log_prob, traj.log_probs[:, j], rtol=1e-4, atol=1e-4)


def test_ddim_loop_matches_diffusers_scheduler_loop():
    """The scanned loop with an analytic predictor equals stepping diffusers' DDIMScheduler by hand."""
    schedule = S.NoiseSchedule.from_config(SCHEDULER)
    theirs = DDIMScheduler.from_config(SCHEDULER)
    theirs.set_timesteps(10)

    def predict(x, t):
        return 0.3 * x + jnp.sin(t / 100.0)

    x_T = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    timesteps, prev_timesteps = S.ddim_timesteps(schedule, 10), S.ddim_prev_timesteps(schedule, 10)
    x0, traj = ddim_loop(predict, schedule, x_T, timesteps, prev_timesteps, 0.0, jax.random.key(0),
                         return_trajectory=True)
    x = torch.from_numpy(x_T.copy())
    for t in theirs.timesteps:
        x = theirs.step(0.3 * x + np.sin(int(t) / 100.0), t, x, eta=0.0).prev_sample
    np.testing.assert_allclose(x0, x.numpy(), atol=1e-5)
    assert np.all(np.isnan(traj.log_probs))  # deterministic DDIM has no density


def test_save_images_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 12, 3), dtype=np.uint8)
    paths = save_images(images, tmp_path / "out", prefix="sample")
    assert [p.name for p in paths] == ["sample_0000.png", "sample_0001.png"]
    for path, image in zip(paths, images, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sample_0000.png", "sample_0001.png"]


def test_bad_inputs_name_the_culprit(sdxl, sdxl_folder, tmp_path):
    with pytest.raises(ValueError, match="height=31 must be a positive multiple"):
        sdxl.encode_prompt(PROMPTS, height=31, width=SIZE)
    with pytest.raises(ValueError, match=r"latents have shape \(2, 4, 8, 8\)"):
        sdxl.sample_latents(PROMPTS, num_steps=2, height=SIZE, width=SIZE, latents=jnp.zeros((2, 4, 8, 8)))
    with pytest.raises(ValueError, match="prompts must be"):
        sdxl.encode_prompt([])
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        Pipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="_class_name='FluxPipeline'"):
        Pipeline.from_pretrained(tmp_path)
