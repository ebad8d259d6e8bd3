"""D3PO training: the online loop with a reward proxy, and the human-feedback rounds (``reference/d3po.md``).

Online (``dpojax train CONFIG`` with ``objective: d3po``, §4): every epoch samples ``num_batches_per_epoch`` ×
``sample_batch_size`` pairs per device from the current policy (same prompt and x_T, independent step noise),
ranks each pair with the reward proxy (sign only, Pareto for vector rewards) and trains on the pairs in
``train_batch_size`` batches, one optimizer step per batch. The reference is the initial model, frozen.
Every ``eval_every`` epochs (and after the last) it scores fresh single samples of fixed prompts and noise, so
evaluations of one run are paired comparisons. Checkpoints are taken at epoch ends (and on SIGTERM/SIGINT); a
run stopped inside an epoch resumes by re-sampling that epoch from the saved policy.

Human rounds (§2 human mode, §7): ``dpojax d3po sample CONFIG --out ROUND`` writes a round folder
(``dpojax.feedback.rounds``) of ``images_per_prompt`` images per prompt; people label it
(``dpojax.feedback.labels``); ``dpojax d3po train ROUND`` trains on all C(k,2) index pairs of each labeled
prompt (h = sign of the score difference; ties are dropped: they carry no gradient), with the round's model
as starting policy and frozen reference, and exports ``ROUND/train/final``: the next round's
``model.pretrained``. A round run resumes exactly (its data is on disk).

Both share the trainer's pieces with Diffusion-DPO: ``load_components``, ``make_optimizer``, ``Checkpointer``,
``MetricsLog``, ``StopRequest`` and the export.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec
from PIL import Image

from dpojax import parallel
from dpojax.config import Config, ConfigError, apply_overrides
from dpojax.feedback.labels import read_labels
from dpojax.feedback.rounds import Round, read_round, write_round
from dpojax.feedback.scorers import make_scorer, score_images
from dpojax.losses import pareto_preference
from dpojax.schedule import NoiseSchedule, ddim_timesteps
from dpojax.train.checkpoint import Checkpointer, abstract_like, start_state, train_state_shardings
from dpojax.train.d3po_step import make_sampler, make_update, text_inputs
from dpojax.train.dpo import StopRequest, TrainResult, check_finite, export_final
from dpojax.train.metrics import MetricsLog
from dpojax.train.optim import make_optimizer
from dpojax.train.state import load_components, shardings_of
from dpojax.train.step import device_batch
from dpojax.weights.atomic import atomic_folder

EVAL_STREAM, SAMPLE_STREAM = 2, 3  # fold_in tags of the evaluation's and the sampler's randomness
SUM_METRICS = ("abs_log_ratio_sum", "abs_log_ratio_count", "wins", "decisive")  # summed, not averaged


def load_prompts(config: Config) -> list[str]:
    """``d3po.prompts``, or the non-empty lines of ``d3po.prompt_file``."""
    d3po = config.d3po
    if d3po.prompt_file is None:
        if not d3po.prompts:
            raise ConfigError("config: d3po.prompts or d3po.prompt_file must give the prompts to sample")
        return list(d3po.prompts)
    try:
        lines = Path(d3po.prompt_file).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ConfigError(f"config: d3po.prompt_file={d3po.prompt_file!r} cannot be read: "
                          f"{err.strerror or err}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"config: d3po.prompt_file={d3po.prompt_file!r} holds no prompts")
    return prompts


def make_reward(config: Config):
    options = {k: v for k, v in (("clip_model", config.d3po.clip_model), ("head", config.d3po.aesthetic_head))
               if v is not None}
    return make_scorer(config.d3po.reward, **options)


@dataclasses.dataclass
class PairBuffer:
    """Trajectories grouped by prompt, and the pairs to train on; host arrays (this process's rows)."""

    latents: np.ndarray  # (G, k, T+1, C, h, w) fp32: x_T ... x_0 of each group member
    text: dict[str, np.ndarray]  # the prompts' text inputs, (G, ...)
    pairs: np.ndarray  # (M, 3) int: group, member a, member b
    preference: np.ndarray  # (M, 2) int32: (h_a, h_b)

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        g, a, b = self.pairs[rows].T
        return {"latents": np.stack([self.latents[g, a], self.latents[g, b]], axis=1),
                **{k: v[g] for k, v in self.text.items()}, "preference": self.preference[rows]}


def label_pairs(scores: np.ndarray, labeled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All C(k,2) index pairs of each labeled prompt with h_a = sign(s_a − s_b), h_b = −h_a; ties dropped."""
    pairs, preference = [], []
    for p in np.flatnonzero(labeled):
        for a, b in itertools.combinations(range(scores.shape[1]), 2):
            sign = int(np.sign(scores[p, a] - scores[p, b]))
            if sign:
                pairs.append((p, a, b))
                preference.append((sign, -sign))
    return np.asarray(pairs, np.int64).reshape(-1, 3), np.asarray(preference, np.int32).reshape(-1, 2)


class D3PORun:
    """One D3PO run: models, compiled programs, train state, checkpoints and the metrics log."""

    def __init__(self, config: Config, run_dir: Path, *, out):
        self.config, self.run_dir, self.out = config, run_dir, out
        self.mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        self.batch_devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if self.batch_devices % jax.process_count():
            raise ValueError(f"{self.batch_devices} batch devices do not split over {jax.process_count()} "
                             f"processes")
        self.local_devices = self.batch_devices // jax.process_count()
        self.components, params, self.frozen = load_components(config, self.mesh)
        tx, lr_schedule = make_optimizer(config.optim, config.learning_rate(self.batch_devices))
        self.checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.train.keep_checkpoints)
        shardings = train_state_shardings(tx, params, self.mesh)
        if self.checkpointer.latest_step() is not None:  # free the pretrained weights before restoring
            params = abstract_like(params, shardings.params)
        self.state, self.meta = start_state(self.checkpointer, tx, params, shardings, config.train.seed)
        del params
        frozen_shardings = shardings_of(self.frozen)
        self.sample = make_sampler(self.components, config, self.mesh, shardings.params, frozen_shardings, 2)
        self.sample_one = make_sampler(self.components, config, self.mesh, shardings.params, frozen_shardings, 1)
        self.update = make_update(self.components, config, tx, lr_schedule, self.mesh, shardings, frozen_shardings)
        self.batch_sharding = parallel.batch_sharding(self.mesh)
        self.step = int(jax.device_get(self.state.step))
        self.log = MetricsLog(run_dir, config.logging, total_steps=0, resume_step=self.step,
                              run_config=config.to_dict(), out=out)  # the caller sets total_steps
        self.timesteps = ddim_timesteps(self.components.schedule, config.d3po.num_steps)
        self.base_key = jax.random.key(config.train.seed)
        self.last_saved = self.step if self.meta is not None else None
        if self.meta is not None:
            self.log.print(f"resumed from {self.checkpointer.directory / str(self.step)} (step {self.step})")

    def close(self) -> None:
        self.checkpointer.wait()
        self.checkpointer.close()
        self.log.close()

    # --- sampling ---

    def to_host(self, x: jax.Array) -> np.ndarray:
        """This process's rows of a batch-sharded array."""
        if jax.process_count() == 1:
            return np.asarray(jax.device_get(x))
        return np.asarray(multihost_utils.global_array_to_host_local_array(
            x, self.mesh, PartitionSpec(parallel.BATCH_AXES)))

    def sample_local(self, sampler: Callable, prompts: list[str], key: jax.Array, group_size: int) -> dict:
        """Sample this process's ``prompts`` (a batch-device multiple), ``group_size`` images each, on host."""
        size = self.config.data.resolution
        text = text_inputs(self.components, prompts, size, size)
        result = sampler(self.state.params, self.frozen, device_batch(text, self.batch_sharding), key)
        return {"text": text, **{k: self.to_host(v) for k, v in result.items()}}

    # --- training ---

    def train_steps(self, buffer: PairBuffer, batches: list[np.ndarray], stop: StopRequest) -> list[dict]:
        """One optimizer step per row batch; returns their metrics (stops early on a signal)."""
        records = []
        for rows in batches:
            self.state, metrics = self.update(self.state, self.frozen,
                                              device_batch(buffer.batch(rows), self.batch_sharding))
            metrics = jax.device_get(metrics)
            self.step += 1
            check_finite(float(metrics["loss"]), self.step, self.checkpointer)
            records.append(metrics)
            if stop.signal_name is not None:
                break
        return records

    def save(self, meta: dict) -> None:
        self.checkpointer.save(self.state, {"config": self.config.to_dict(),
                                            "unet_config": self.components.unet_config, **meta})
        self.last_saved = self.step

    def should_save(self, steps_before: int) -> bool:
        every = self.config.train.checkpoint_every
        return bool(every) and self.step // every > steps_before // every

    def finish(self, stop: StopRequest) -> TrainResult:
        self.checkpointer.wait()
        if stop.signal_name is not None:
            self.log.print(f"stopped by {stop.signal_name} at step {self.step}; checkpoint saved in "
                           f"{self.checkpointer.directory / str(self.step)}")
            return TrainResult(self.step, self.run_dir, interrupted_by=stop.signal_name)
        final = export_final(self.config, self.components, self.state.params, self.run_dir, self.log)
        return TrainResult(self.step, self.run_dir, final=final)


def summarize(step_metrics: list[dict], timesteps: np.ndarray) -> dict[str, float]:
    """Epoch metrics: means of the per-step scalars, the win rate, mean |log ρ| per sampling timestep."""
    if not step_metrics:
        return {}
    out = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0] if k not in SUM_METRICS}
    total = {k: np.sum([np.asarray(m[k]) for m in step_metrics], axis=0) for k in SUM_METRICS}
    out["win_rate"] = float(total["wins"] / total["decisive"]) if total["decisive"] else 0.0
    for t, s, c in zip(timesteps, total["abs_log_ratio_sum"], total["abs_log_ratio_count"], strict=True):
        if c:
            out[f"abs_log_ratio_t{int(t):04d}"] = float(s / c)
    return out


def global_stats(values: np.ndarray, prefix: str) -> dict[str, float]:
    """Mean and std over every process's rows (of a scalar reward, or per column of a vector reward)."""
    if jax.process_count() > 1:
        values = np.asarray(multihost_utils.process_allgather(values, tiled=True))
    values = values.reshape(len(values), -1)
    if values.shape[1] == 1:
        return {f"{prefix}_mean": float(values.mean()), f"{prefix}_std": float(values.std())}
    return {f"{prefix}_mean_{i}": float(v) for i, v in enumerate(values.mean(axis=0))}


# --- online training ---------------------------------------------------------------------------------------

def train_online(config: Config, *, out=None) -> TrainResult:
    """Run (or continue) D3PO with the reward proxy ``d3po.reward``."""
    out = out or sys.stdout
    d3po = config.d3po
    pairs_per_epoch = d3po.num_batches_per_epoch * d3po.sample_batch_size
    if pairs_per_epoch % d3po.train_batch_size:
        raise ConfigError(f"config: d3po.train_batch_size={d3po.train_batch_size} must divide the "
                          f"{pairs_per_epoch} pairs per device of an epoch (num_batches_per_epoch × "
                          f"sample_batch_size)")
    steps_per_epoch = pairs_per_epoch // d3po.train_batch_size * d3po.num_inner_epochs
    prompts = load_prompts(config)
    scorer = make_reward(config)
    run = D3PORun(config, Path(config.train.output_dir).absolute(), out=out)
    run.log.total_steps = d3po.num_epochs * steps_per_epoch
    stop = StopRequest()
    try:
        with stop.installed():
            start = run.meta["epoch"] if run.meta is not None else 0
            for epoch in range(start, d3po.num_epochs):
                record = {"epoch": epoch}
                if d3po.eval_every and epoch % d3po.eval_every == 0:
                    record.update(evaluate(run, prompts, scorer, epoch))
                steps_before, began = run.step, time.perf_counter()
                buffer, reward_stats = sample_epoch(run, prompts, scorer, epoch)
                step_metrics = train_epoch(run, buffer, epoch, stop)
                record.update(reward_stats, **summarize(step_metrics, run.timesteps))
                pairs = len(step_metrics) * d3po.train_batch_size * run.batch_devices
                run.log.write(run.step, record, pairs_per_second=pairs / (time.perf_counter() - began),
                              show=epoch % config.train.log_every == 0 or epoch == d3po.num_epochs - 1)
                if stop.signal_name is not None:
                    run.save({"epoch": epoch})  # inside the epoch: it is re-sampled on resume
                    break
                if run.should_save(steps_before) or epoch == d3po.num_epochs - 1:
                    run.save({"epoch": epoch + 1})
            if stop.signal_name is None and d3po.eval_every:
                final_eval = evaluate(run, prompts, scorer, d3po.num_epochs)
                run.log.write(run.step, {"epoch": d3po.num_epochs, **final_eval},
                              pairs_per_second=None, show=True)
            return run.finish(stop)
    finally:
        run.close()


def local_prompts(prompts: list[str], count: int, seed: list[int]) -> list[str]:
    """``count`` prompts drawn uniformly with replacement (D3PO's prompt_fn), from a seeded generator."""
    rng = np.random.default_rng(seed)
    return [prompts[i] for i in rng.integers(0, len(prompts), count)]


def sample_epoch(run: D3PORun, prompts: list[str], scorer, epoch: int) -> tuple[PairBuffer, dict[str, float]]:
    """Sample and rank this epoch's pairs (this process's share); returns them and the reward statistics."""
    d3po, seed = run.config.d3po, run.config.train.seed
    latents, texts, preference, rewards = [], [], [], []
    for b in range(d3po.num_batches_per_epoch):
        batch_prompts = local_prompts(prompts, d3po.sample_batch_size * run.local_devices,
                                      [seed, epoch, b, jax.process_index()])
        key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(run.base_key, SAMPLE_STREAM), epoch), b)
        result = run.sample_local(run.sample, batch_prompts, key, 2)
        reward = score_images(scorer, result["images"], [p for p in batch_prompts for _ in range(2)])
        reward = reward.reshape(len(batch_prompts), 2, -1)
        preference.append(np.asarray(pareto_preference(reward[:, 0], reward[:, 1]), np.int32))
        latents.append(result["latents"].reshape(len(batch_prompts), 2, *result["latents"].shape[1:]))
        texts.append(result["text"])
        rewards.append(reward.reshape(len(batch_prompts) * 2, -1))
    preference = np.concatenate(preference)
    text = {k: np.concatenate([t[k] for t in texts]) for k in texts[0]}
    pairs = np.stack([np.arange(len(preference)), np.zeros(len(preference), int), np.ones(len(preference), int)], 1)
    stats = global_stats(np.concatenate(rewards), "reward")
    stats["tie_fraction"] = float(np.mean(np.all(preference == 0, axis=1)))
    return PairBuffer(np.concatenate(latents), text, pairs, preference), stats


def train_epoch(run: D3PORun, buffer: PairBuffer, epoch: int, stop: StopRequest) -> list[dict]:
    """``num_inner_epochs`` shuffled passes over this process's pairs, ``train_batch_size`` per device each."""
    d3po = run.config.d3po
    per_batch = d3po.train_batch_size * run.local_devices
    rng = np.random.default_rng([run.config.train.seed, epoch, jax.process_index()])
    metrics = []
    for _ in range(d3po.num_inner_epochs):
        order = rng.permutation(len(buffer.pairs))
        metrics += run.train_steps(buffer, [order[i:i + per_batch] for i in range(0, len(order), per_batch)], stop)
        if stop.signal_name is not None:
            break
    return metrics


def evaluate(run: D3PORun, prompts: list[str], scorer, epoch: int) -> dict[str, float]:
    """Mean/std reward of one fresh image each for ``eval_batch_size`` prompts per device; the prompts and the
    noise are the same at every evaluation of the run. Process 0 also keeps its images and their rewards."""
    count = run.config.d3po.eval_batch_size * run.local_devices
    batch_prompts = local_prompts(prompts, count, [run.config.train.seed, EVAL_STREAM, jax.process_index()])
    result = run.sample_local(run.sample_one, batch_prompts, jax.random.fold_in(run.base_key, EVAL_STREAM), 1)
    rewards = score_images(scorer, result["images"], batch_prompts)
    if jax.process_index() == 0:
        write_eval_samples(Path(run.config.train.output_dir) / "eval" / f"epoch_{epoch:04d}", result["images"],
                           batch_prompts, rewards)
    return global_stats(rewards, "eval_reward")


def write_eval_samples(folder: Path, images: np.ndarray, prompts: list[str], rewards: np.ndarray) -> None:
    """``NN.png`` and ``rewards.json`` (prompt and reward of each image), written all at once; an evaluation
    repeated after a resume finds its folder and keeps it (same model, prompts and noise)."""
    if folder.exists():
        return
    with atomic_folder(folder) as tmp:
        for i, image in enumerate(images):
            Image.fromarray(image).save(tmp / f"{i:02d}.png")
        samples = [{"image": f"{i:02d}.png", "prompt": p, "reward": r}
                   for i, (p, r) in enumerate(zip(prompts, np.asarray(rewards).tolist(), strict=True))]
        (tmp / "rewards.json").write_text(json.dumps(samples, indent=1))


# --- human-feedback rounds ---------------------------------------------------------------------------------

def sample_round(config: Config, out_dir: str | Path, *, out=None) -> Path:
    """Sample ``d3po.round_prompts`` prompts × ``d3po.images_per_prompt`` images with their trajectories and
    write them as a new round folder."""
    out = out or sys.stdout
    out_dir = Path(out_dir)
    if out_dir.exists():  # before any work: a round is never replaced
        raise FileExistsError(f"round folder {out_dir} already exists; write the new round to a new folder")
    if jax.process_count() != 1:
        raise ValueError("dpojax d3po sample runs in one process")
    d3po = config.d3po
    if config.model.pretrained is not None:  # the round records where its model is, from anywhere
        config = apply_overrides(config.to_dict(), [f"model.pretrained={Path(config.model.pretrained).absolute()}"])
    seed = d3po.seed if d3po.seed is not None else secrets.randbits(31)
    prompts = local_prompts(load_prompts(config), d3po.round_prompts, [seed])
    k = d3po.images_per_prompt
    run = _SamplingModel(config, k)
    per_call = d3po.sample_batch_size * run.batch_devices
    chunks = []
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start:start + per_call]
        padded = chunk + [chunk[-1]] * (per_call - len(chunk))  # fixed shapes: one compiled program
        result = run.sample(padded, jax.random.fold_in(jax.random.key(seed), start))
        chunks.append({name: v[:len(chunk) * k].reshape(len(chunk), k, *v.shape[1:])
                       for name, v in result.items() if name != "text"})
        print(f"sampled {min(start + per_call, len(prompts))}/{len(prompts)} prompts", file=out, flush=True)
    merged = {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
    timesteps = np.broadcast_to(run.timesteps, (len(prompts), len(run.timesteps)))
    arrays = {"latents": merged["latents"], "log_probs": merged["log_probs"],
              "timesteps": np.ascontiguousarray(timesteps, np.int32)}
    meta = {"config": config.to_dict(), "seed": seed, "unet_config": run.unet_config}
    path = write_round(out_dir, Round(prompts, merged["images"], arrays, meta))
    print(f"wrote round {path} ({len(prompts)} prompts × {k} images); label it, then run "
          f"`dpojax d3po train {path}`", file=out, flush=True)
    return path


class _SamplingModel:
    """The models and sampler of ``model.pretrained`` without an optimizer (round sampling)."""

    def __init__(self, config: Config, group_size: int):
        self.config = config
        mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        self.batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
        self.components, self.params, self.frozen = load_components(config, mesh)
        if self.components.lora is None:  # with LoRA the reference is the base the adapters sit on
            self.frozen.pop("reference", None)
        self.sampler = make_sampler(self.components, config, mesh, shardings_of(self.params),
                                    shardings_of(self.frozen), group_size)
        self.batch_sharding = parallel.batch_sharding(mesh)
        self.unet_config = self.components.unet_config
        self.timesteps = ddim_timesteps(self.components.schedule, config.d3po.num_steps)

    def sample(self, prompts: list[str], key: jax.Array) -> dict[str, np.ndarray]:
        size = self.config.data.resolution
        text = text_inputs(self.components, prompts, size, size)
        result = self.sampler(self.params, self.frozen, device_batch(text, self.batch_sharding), key)
        return {k: np.asarray(jax.device_get(v)) for k, v in result.items()}


def train_round(round_dir: str | Path, overrides: list[str] = (), *, out=None) -> TrainResult:
    """Train on a labeled round: starting policy and frozen reference are the model that sampled it."""
    out = out or sys.stdout
    round_dir = Path(round_dir)
    labels = read_labels(round_dir)  # checks the folder and every label file before the arrays are read
    round_ = read_round(round_dir)
    if not isinstance(round_.meta.get("config"), dict):
        raise ValueError(f"{round_dir}/round.json has no 'config' in its meta (not written by `dpojax d3po sample`)")
    config = apply_overrides(round_.meta["config"], [f"train.output_dir={round_dir.absolute() / 'train'}",
                                                     *overrides])
    sampled_with = round_.meta["config"].get("model", {}).get("pretrained")
    if config.model.pretrained != sampled_with:
        raise ConfigError(f"config: model.pretrained must stay the round's model {sampled_with!r} (it is the "
                          f"reference), got {config.model.pretrained!r}")
    latents = _check_trajectories(round_, config, round_dir)
    pairs, preference = label_pairs(labels.scores, labels.labeled)
    if not len(pairs):
        raise ValueError(f"{round_dir}: no labeled pair to train on ({int(labels.labeled.sum())} of "
                         f"{len(round_.prompts)} prompts labeled by {len(labels.annotators)} annotators, "
                         f"every labeled pair ties)")
    d3po = config.d3po
    run_dir = Path(config.train.output_dir)
    size = config.data.resolution
    if jax.process_count() != 1:
        raise ValueError("dpojax d3po train runs in one process")
    run = D3PORun(config, run_dir, out=out)
    per_step = d3po.train_batch_size * run.batch_devices
    steps_per_epoch = -(-len(pairs) // per_step)
    run.log.total_steps = d3po.num_epochs * steps_per_epoch
    text = text_inputs(run.components, list(round_.prompts), size, size)
    buffer = PairBuffer(latents, text, pairs, preference)
    run.log.print(f"round {round_dir}: {len(pairs)} labeled pairs from {int(labels.labeled.sum())} prompts "
                  f"({len(labels.annotators)} annotators), {steps_per_epoch} steps per epoch")
    stop = StopRequest()
    try:
        with stop.installed():
            start = run.step // steps_per_epoch
            for epoch in range(start, d3po.num_epochs):
                rng = np.random.default_rng([config.train.seed, epoch])
                order = rng.permutation(len(pairs))
                order = np.concatenate([order, order[:(-len(order)) % per_step]])  # wrap: every pair trains
                batches = [order[i:i + per_step] for i in range(0, len(order), per_step)]
                steps_before, began = run.step, time.perf_counter()
                step_metrics = run.train_steps(buffer, batches[run.step - epoch * steps_per_epoch:], stop)
                record = {"epoch": epoch, **summarize(step_metrics, run.timesteps)}
                run.log.write(run.step, record, pairs_per_second=len(step_metrics) * per_step /
                              (time.perf_counter() - began),
                              show=epoch % config.train.log_every == 0 or epoch == d3po.num_epochs - 1)
                if stop.signal_name is not None or run.should_save(steps_before) or epoch == d3po.num_epochs - 1:
                    run.save({"epoch": epoch})
                if stop.signal_name is not None:
                    break
            result = run.finish(stop)
            if result.final is not None:
                run.log.print(f"next round: dpojax d3po sample CONFIG --out NEXT_ROUND "
                              f"model.pretrained={result.final}")
            return result
    finally:
        run.close()


def _check_trajectories(round_: Round, config: Config, round_dir: Path) -> np.ndarray:
    """The round's (P, k, T+1, C, h, w) latents, checked against its prompts, images and sampling settings."""
    latents = round_.arrays.get("latents")
    num_prompts, k = round_.images.shape[:2]
    steps = config.d3po.num_steps
    if latents is None or latents.ndim != 6 or latents.shape[:3] != (num_prompts, k, steps + 1):
        got = "none" if latents is None else str(latents.shape)
        raise ValueError(f"{round_dir}/trajectories.safetensors: 'latents' must be ({num_prompts}, {k}, "
                         f"{steps + 1}, C, h, w) for d3po.num_steps={steps}, got {got}")
    schedule = NoiseSchedule.from_config(json.loads(
        (Path(config.model.pretrained) / "scheduler" / "scheduler_config.json").read_text()))
    stored = round_.arrays.get("timesteps")
    if stored is None or not np.array_equal(stored, np.broadcast_to(ddim_timesteps(schedule, steps), stored.shape)):
        raise ValueError(f"{round_dir}/trajectories.safetensors: 'timesteps' do not match the {steps}-step DDIM "
                         f"schedule of {config.model.pretrained}")
    return np.asarray(latents, np.float32)
