"""The PyTorch side of `dpojax bench`: the reference Diffusion-DPO and D3PO steps with diffusers' UNet.

Written as the official code does it (docs/losses.md, docs/d3po.md): winners then
losers in one batch, one noise and timestep per pair, the reference under ``no_grad``, ``-logsigmoid`` of
``-β/2·(Δθ − Δref)``, global-norm clip, then the optimizer; D3PO loops over its K timesteps with a backward at
each and one optimizer step. Models come from the same pipeline folder and dtypes as the JAX run. Only
``dpojax.bench`` and the tests import this module (torch and diffusers are test extras).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, PreTrainedModel

from dpojax.config import Config
from dpojax.diffusers_folder import read_pipeline_folder

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchRunner:
    """Policy and reference UNets, VAE, text encoders and optimizer of ``config`` in PyTorch."""

    def __init__(self, config: Config, threads: int, *, device: str = "cpu", random: bool = False):
        """``device``: "cpu" or "cuda"; ``random``: random weights on the architecture of ``model.pretrained``
        (its config files), made on the device, instead of its weights."""
        torch.set_num_threads(threads)
        torch.manual_seed(config.train.seed)
        folder = Path(config.model.pretrained)
        self.config, self.threads, self.device = config, threads, torch.device(device)
        self.dtype = TORCH_DTYPES[config.model.dtype]
        frozen = TORCH_DTYPES[config.model.reference_dtype]

        def load(cls, path: Path, dtype: torch.dtype):
            if not random:
                return cls.from_pretrained(path).to(self.device, dtype)
            with self.device:  # initialised where it runs
                if issubclass(cls, PreTrainedModel):
                    return cls(cls.config_class.from_pretrained(path)).to(dtype)
                return cls.from_config(cls.load_config(path)).to(dtype)

        self.unet = load(UNet2DConditionModel, folder / "unet", TORCH_DTYPES[config.model.param_dtype]).train()
        self.reference = load(UNet2DConditionModel, folder / "unet", frozen).requires_grad_(False).eval()
        self.vae = load(AutoencoderKL, Path(config.model.vae or folder / "vae"), frozen).requires_grad_(False)
        self.text_encoder = load(CLIPTextModel, folder / "text_encoder", frozen).requires_grad_(False)
        self.text_encoder_2 = None
        if (folder / "text_encoder_2").is_dir():
            self.text_encoder_2 = load(CLIPTextModelWithProjection, folder / "text_encoder_2",
                                       frozen).requires_grad_(False)
        self.scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)  # add_noise indexes it
        self.alphas_cumprod = self.scheduler.alphas_cumprod.float()
        self.final_alpha_cumprod = (self.alphas_cumprod[0] if self.scheduler.config.get("set_alpha_to_one") is False
                                    else torch.tensor(1.0, device=self.device))
        optim = config.optim
        lr = config.learning_rate(1)
        if optim.name == "adamw":
            self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=lr, betas=optim.betas, eps=optim.eps,
                                               weight_decay=optim.weight_decay)
        else:
            from transformers.optimization import Adafactor

            self.optimizer = Adafactor(self.unet.parameters(), lr=lr, scale_parameter=False, relative_step=False,
                                       warmup_init=False, clip_threshold=1.0, weight_decay=optim.weight_decay)

    def describe(self) -> str:
        where = f"{self.threads} threads" if self.device.type == "cpu" else torch.cuda.get_device_name(self.device)
        attention = type(self.unet.attn_processors[next(iter(self.unet.attn_processors))]).__name__
        memory = ("" if self.device.type != "cuda"
                  else f"; peak memory {torch.cuda.max_memory_allocated(self.device) / 2 ** 30:.2f} GiB")
        return (f"diffusers UNet2DConditionModel, torch {torch.__version__} on {self.device.type} ({where}), "
                f"compute {str(self.dtype).removeprefix('torch.')}, {attention}{memory}")

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    # --- conditioning -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, input_ids: np.ndarray, input_ids_2: np.ndarray | None):
        """(hidden states, pooled or None) as the SD / SDXL pipelines compute them."""
        ids = self.tensor(input_ids).long()
        if self.text_encoder_2 is None:
            return self.text_encoder(ids).last_hidden_state, None
        out = self.text_encoder(ids, output_hidden_states=True)
        out_2 = self.text_encoder_2(self.tensor(input_ids_2).long(), output_hidden_states=True)
        return torch.cat([out.hidden_states[-2], out_2.hidden_states[-2]], dim=-1), out_2.text_embeds

    def unet_call(self, unet, latents, timesteps, hidden, pooled, time_ids):
        added = None if pooled is None else {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.to(self.dtype)}
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return unet(latents.to(self.dtype), timesteps, hidden.to(self.dtype), added_cond_kwargs=added).sample

    def optimizer_step(self) -> None:
        if self.config.optim.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.config.optim.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":  # the JAX side's step returns once its results are ready; so does this
            torch.cuda.synchronize(self.device)

    # --- Diffusion-DPO ----------------------------------------------------------------------------------------

    def dpo_step(self, batch: dict[str, np.ndarray]):
        """A zero-argument callable running one official Diffusion-DPO step on ``batch`` (see dpojax.bench)."""
        beta = self.config.loss.beta
        time_ids = None
        if "time_ids" in batch:  # (P, 2, 6): winners' rows, then losers'
            time_ids = self.tensor(np.concatenate([batch["time_ids"][:, 0], batch["time_ids"][:, 1]]))

        def step():
            with torch.no_grad():
                if "latent_mean" in batch:
                    mean, logvar = (self.tensor(np.concatenate([batch[k][:, 0], batch[k][:, 1]]))
                                    for k in ("latent_mean", "latent_logvar"))
                    latents = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
                    hidden = self.tensor(batch["hidden"])
                    pooled = self.tensor(batch["pooled"]) if "pooled" in batch else None
                else:
                    pixels = np.concatenate([batch["pixels"][:, 0], batch["pixels"][:, 1]]).transpose(0, 3, 1, 2)
                    vae_dtype = next(self.vae.parameters()).dtype
                    latents = self.vae.encode(self.tensor(pixels).to(vae_dtype)).latent_dist.sample().float()
                    hidden, pooled = self.encode_text(batch["input_ids"], batch.get("input_ids_2"))
                shift = self.vae.config.shift_factor
                latents = (latents - (shift or 0.0)) * self.vae.config.scaling_factor
                pairs = latents.shape[0] // 2
                noise = torch.randn_like(latents[:pairs]).repeat(2, 1, 1, 1)
                timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (pairs,),
                                          device=self.device).repeat(2)
                noisy = self.scheduler.add_noise(latents, noise, timesteps)
                hidden = hidden.repeat(2, 1, 1)
                pooled = None if pooled is None else pooled.repeat(2, 1)
            pred = self.unet_call(self.unet, noisy, timesteps, hidden, pooled, time_ids)
            model_losses = (pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
            model_w, model_l = model_losses.chunk(2)
            with torch.no_grad():
                ref = self.unet_call(self.reference, noisy, timesteps, hidden, pooled, time_ids)
                ref_w, ref_l = (ref.float() - noise.float()).pow(2).mean(dim=[1, 2, 3]).chunk(2)
            inside = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
            loss = -F.logsigmoid(inside).mean()
            loss.backward()
            self.optimizer_step()

        return step

    # --- D3PO ---------------------------------------------------------------------------------------------------

    def d3po_step(self, batch: dict[str, np.ndarray]):
        """A zero-argument callable running one D3PO update on ``batch``: a backward per trained timestep."""
        from dpojax import schedule as sched

        d3po = self.config.d3po
        steps = d3po.num_steps
        positions_k = max(1, int(steps * d3po.timestep_fraction))
        schedule = sched.NoiseSchedule.from_config(dict(self.scheduler.config))
        timesteps = self.tensor(np.asarray(sched.ddim_timesteps(schedule, steps), np.int64))
        prev_timesteps = self.tensor(np.asarray(sched.ddim_prev_timesteps(schedule, steps), np.int64))
        latents = self.tensor(batch["latents"])  # (P, 2, T+1, C, h, w)
        pairs = latents.shape[0]
        flat = latents.reshape((2 * pairs,) + latents.shape[2:])
        preference = self.tensor(batch["preference"]).float()
        time_ids = self.tensor(batch["time_ids"]).repeat_interleave(2, 0) if "time_ids" in batch else None
        guided = d3po.guidance_scale > 1
        folder = read_pipeline_folder(self.config.model.pretrained)
        if not folder.force_zeros_for_empty_prompt:  # the negative is the encoded empty prompt
            empty = (folder.token_ids([""]) if folder.tokenizer is not None  # else random weights: any ids do
                     else {"input_ids": np.zeros((1, batch["input_ids"].shape[1]), np.int64)})
            empty_hidden, empty_pooled = self.encode_text(empty["input_ids"], empty.get("input_ids_2"))

        def negative(hidden, pooled):
            if folder.force_zeros_for_empty_prompt:
                return torch.zeros_like(hidden), None if pooled is None else torch.zeros_like(pooled)
            return empty_hidden.expand_as(hidden), None if pooled is None else empty_pooled.expand_as(pooled)

        def predict(unet, x, t, hidden, pooled):
            if not guided:
                return self.unet_call(unet, x, t, hidden, pooled, time_ids)
            ids = None if time_ids is None else torch.cat([time_ids, time_ids])
            neg_hidden, neg_pooled = negative(hidden, pooled)
            both_pooled = None if pooled is None else torch.cat([neg_pooled, pooled])
            out = self.unet_call(unet, torch.cat([x, x]), torch.cat([t, t]), torch.cat([neg_hidden, hidden]),
                                 both_pooled, ids)
            uncond, cond = out.float().chunk(2)
            return uncond + d3po.guidance_scale * (cond - uncond)

        def step():
            hidden, pooled = self.encode_text(batch["input_ids"], batch.get("input_ids_2"))
            hidden = hidden.repeat_interleave(2, 0)
            pooled = None if pooled is None else pooled.repeat_interleave(2, 0)
            perms = torch.stack([torch.randperm(steps, device=self.device)[:positions_k]
                                 for _ in range(pairs)]).repeat_interleave(2, 0)
            rows = torch.arange(2 * pairs, device=self.device)
            for j in range(positions_k):
                pos = perms[:, j]
                x, x_next = flat[rows, pos], flat[rows, pos + 1]
                t, t_prev = timesteps[pos], prev_timesteps[pos]
                with torch.no_grad():
                    ref_logp = ddim_log_prob(self.alphas_cumprod, self.final_alpha_cumprod,
                                             predict(self.reference, x, t, hidden, pooled), t, t_prev, x, x_next,
                                             d3po.eta)
                logp = ddim_log_prob(self.alphas_cumprod, self.final_alpha_cumprod,
                                     predict(self.unet, x, t, hidden, pooled), t, t_prev, x, x_next, d3po.eta)
                ratio = torch.clamp(torch.exp(logp - ref_logp), 1 - d3po.eps, 1 + d3po.eps).reshape(pairs, 2)
                logits = d3po.beta * (preference * torch.log(ratio)).sum(-1)
                loss = -F.logsigmoid(logits).mean() / positions_k
                loss.backward()
            self.optimizer_step()

        return step


def ddim_log_prob(alphas_cumprod, final_alpha_cumprod, eps, t, t_prev, x_t, x_prev, eta: float):
    """Per-sample mean log N(x_prev; μ, σ²) of a DDIM step from x_t at t to t_prev (< 0: past the end, where
    ᾱ is ``final_alpha_cumprod``) with noise prediction ``eps``: DDPO's ``ddim_step_with_logprob``, in the
    dtype of its arguments. Used by the benchmark and, in float64, as the tests' oracle."""
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    a_t = alphas_cumprod[t].reshape(shape)
    a_prev = torch.where(t_prev >= 0, alphas_cumprod[t_prev.clamp(min=0)],
                         torch.as_tensor(final_alpha_cumprod, dtype=alphas_cumprod.dtype)).reshape(shape)
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    sigma = sigma.clamp(min=1e-6)
    log_prob = -((x_prev.detach() - mean) ** 2) / (2 * sigma**2) - sigma.log() - math.log(math.sqrt(2 * math.pi))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
