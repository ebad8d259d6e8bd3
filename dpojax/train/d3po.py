"""D3PO (``objective: d3po``): online training with a reward proxy, and the human-feedback rounds.

What this objective owns (docs/d3po.md): its data, pairs of denoising trajectories of one prompt and one
starting noise; its step (``dpojax.train.d3po_step.make_update``: the DPO loss at K denoising steps of each
pair, one optimizer step per batch); and, online, the per-epoch sampling and the evaluations. The setup,
checkpoints, resume, stop on SIGTERM/SIGINT, finite-loss check, logs and export are the harness's
(``dpojax.train.harness``).

Online (``dpojax train CONFIG``): every epoch samples ``num_batches_per_epoch`` x ``sample_batch_size`` pairs
per device from the current policy (same prompt and x_T, independent step noise), ranks each pair with the
reward proxy (sign only, Pareto for vector rewards) and trains on them, ``train_batch_size`` pairs per device
per step, ``num_inner_epochs`` times. The reference is the initial model, frozen. Every ``eval_every`` epochs
(and after the last) it scores fresh single samples of fixed prompts and noise, so the evaluations of one run
are paired comparisons.

Human rounds: ``dpojax d3po sample CONFIG --out ROUND`` writes a round folder (``dpojax.feedback.rounds``) of
``images_per_prompt`` images per prompt; people label it (``dpojax.feedback.labels``); ``dpojax d3po train
ROUND`` trains on all C(k,2) index pairs of each labeled prompt (h = sign of the score difference; ties carry
no gradient and are dropped), with the round's model as starting policy and frozen reference, and exports
``ROUND/train/final``: the next round's ``model.pretrained``.

The data position in a checkpoint means the same in both: the epoch in progress and the optimizer steps of it
already taken. Online, an epoch's pairs come from the policy at its start, so a checkpoint inside an epoch also
holds them (``OnlinePairs.arrays``); a round's pairs are read from its folder again. Either way a resumed run
trains on the same batches in the same order as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import itertools
import json
import secrets
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from dpojax import parallel
from dpojax.config import Config, ConfigError, apply_overrides
from dpojax.diffusers_folder import read_pipeline_folder
from dpojax.feedback.labels import read_labels
from dpojax.feedback.rounds import Round, read_round, write_round
from dpojax.losses import pareto_preference
from dpojax.schedule import ddim_timesteps
from dpojax.scorers.base import score_images
from dpojax.scorers.registry import scorer_from_config
from dpojax.train.d3po_step import latent_size, make_sampler, make_update, text_inputs, text_shapes
from dpojax.train.harness import Program, Run, Setup, TrainResult, itstime
from dpojax.weights.atomic import atomic_folder

EVAL_STREAM, SAMPLE_STREAM = 2, 3  # fold_in tags of the evaluation's and the sampler's randomness
SUM_METRICS = ("abs_log_ratio_sum", "abs_log_ratio_count", "wins", "decisive")  # summed, not averaged
SHIPPED_PROMPTS = importlib.resources.files("dpojax") / "prompts"


def load_prompts(config: Config) -> list[str]:
    """``d3po.prompts``, or the non-empty lines of ``d3po.prompt_file`` (a path, or a shipped list's name)."""
    d3po = config.d3po
    if d3po.prompt_file is None:
        return list(d3po.prompts)
    path = Path(d3po.prompt_file)
    if not path.exists() and path.name == d3po.prompt_file and SHIPPED_PROMPTS.joinpath(path.name).is_file():
        path = Path(str(SHIPPED_PROMPTS.joinpath(path.name)))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        shipped = ", ".join(sorted(p.name for p in SHIPPED_PROMPTS.iterdir() if p.name.endswith(".txt")))
        raise ConfigError(f"config: d3po.prompt_file={d3po.prompt_file!r} cannot be read: {err.strerror or err} "
                          f"(shipped lists: {shipped})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"config: d3po.prompt_file={d3po.prompt_file!r} holds no prompts")
    return prompts


def draw_prompts(prompts: list[str], count: int, seed: list[int]) -> list[str]:
    """``count`` prompts drawn uniformly with replacement (D3PO's prompt_fn), from a seeded generator."""
    rng = np.random.default_rng(seed)
    return [prompts[i] for i in rng.integers(0, len(prompts), count)]


# --- pairs ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PairBuffer:
    """Trajectories grouped by prompt, and the pairs to train on; host arrays."""

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


def summarize(step_metrics: list[dict], timesteps: np.ndarray) -> dict[str, float]:
    """Epoch metrics: means of the per-step scalars, the win rate, mean |log ρ| per sampling timestep.

    In float64, so metrics restored from a checkpoint's JSON sum to the same bits as the original float32 ones."""
    if not step_metrics:
        return {}
    out = {k: float(np.mean(np.asarray([m[k] for m in step_metrics], np.float64)))
           for k in step_metrics[0] if k not in SUM_METRICS}
    total = {k: np.sum(np.asarray([m[k] for m in step_metrics], np.float64), axis=0) for k in SUM_METRICS}
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


class EpochPairs:
    """The pairs of the epoch in progress and how far training has gone in it (a harness ``DataSource``).

    ``batches`` are this process's rows of each optimizer step of the epoch; ``taken`` how many are done, and
    ``step_metrics`` their metrics: a run resumed inside an epoch still summarizes the whole epoch.
    """

    def __init__(self, run: Run):
        self.run = run
        self.timesteps = ddim_timesteps(run.components.schedule, run.config.d3po.num_steps)
        position = run.resumed["data_position"] if run.resumed is not None else {"epoch": 0, "taken": 0}
        self.epoch, self.taken = position["epoch"], position["taken"]
        self.record: dict = position.get("record", {})  # the epoch record so far (evaluation, reward statistics)
        self.step_metrics = [{k: np.asarray(v) for k, v in m.items()} for m in position.get("step_metrics", [])]
        self.buffer: PairBuffer | None = None
        self.batches: list[np.ndarray] = []

    def remaining(self) -> list[np.ndarray]:
        return self.batches[self.taken:]

    def global_batch(self, rows: np.ndarray) -> dict[str, jax.Array]:
        return parallel.global_batch(self.buffer.batch(rows), self.run.mesh)

    def step_taken(self, metrics: dict) -> dict | None:
        """Count one optimizer step of the epoch and its (host) metrics; returns the epoch's record (its
        evaluation, rewards and step metrics) when that step ended the epoch."""
        self.taken += 1
        self.step_metrics.append(metrics)
        if not self.epoch_done:
            return None
        return {"epoch": self.epoch, **self.record, **summarize(self.step_metrics, self.timesteps)}

    def next_epoch(self) -> None:
        self.epoch, self.taken, self.record, self.step_metrics = self.epoch + 1, 0, {}, []

    @property
    def epoch_done(self) -> bool:
        return bool(self.batches) and self.taken == len(self.batches)

    def position(self) -> dict:
        if self.epoch_done:
            return {"epoch": self.epoch + 1, "taken": 0}
        return {"epoch": self.epoch, "taken": self.taken, "record": self.record,
                "step_metrics": [{k: np.asarray(v).tolist() for k, v in m.items()} for m in self.step_metrics]}

    def arrays(self) -> dict[str, jax.Array] | None:
        return None


def d3po_shapes(setup: Setup, pairs: int) -> dict[str, tuple[tuple[int, ...], object]]:
    """``{name: (shape, dtype)}`` of the update's batch of ``pairs`` pairs (global)."""
    components, d3po = setup.components, setup.config.d3po
    h, w = latent_size(components, d3po.resolution)
    return {"latents": ((pairs, 2, d3po.num_steps + 1, components.latent_channels, h, w), jnp.float32),
            **text_shapes(components, pairs), "preference": ((pairs, 2), jnp.int32)}


def update_program(setup: Setup) -> Program:
    """The program that makes one optimizer step (what ``dpojax plan`` compiles)."""
    pairs = setup.config.d3po.train_batch_size * setup.batch_devices
    return Program("update", make_update(setup),
                   (setup.abstract_state(), setup.abstract_frozen(), setup.batch_spec(d3po_shapes(setup, pairs))),
                   ("state", "frozen", "batch"))


def sampler_program(setup: Setup, prompts: int, group_size: int, name: str) -> Program:
    """The sampler of ``group_size`` trajectories for each of ``prompts`` prompts (global)."""
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (setup.abstract_state().params, setup.abstract_frozen(),
            setup.batch_spec(text_shapes(setup.components, prompts)),
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=setup.replicated))
    return Program(name, make_sampler(setup, group_size), args, ("params", "frozen", "batch", "scalar"))


# --- online training ---------------------------------------------------------------------------------------

class OnlinePairs(EpochPairs):
    """Each epoch's pairs, sampled from the policy at the epoch's start and ranked by the reward proxy."""

    def __init__(self, run: Run, sample):
        super().__init__(run)
        self.sample = sample  # the compiled pair sampler
        d3po = run.config.d3po
        self.prompts_per_batch = d3po.sample_batch_size * run.setup.local_batch_devices
        if self.taken:  # resumed inside an epoch: its pairs were saved with the checkpoint
            self.buffer = self._from_arrays(run.restore_data(self._arrays_target()))
            self.batches = self._epoch_batches()

    def start_epoch(self, prompts: list[str], scorer) -> None:
        """Sample and rank this epoch's pairs (this process's share); adds the reward statistics to the record."""
        run, d3po, seed = self.run, self.run.config.d3po, self.run.config.train.seed
        latents, texts, preference, rewards = [], [], [], []
        for b in range(d3po.num_batches_per_epoch):
            batch_prompts = draw_prompts(prompts, self.prompts_per_batch, [seed, self.epoch, b, jax.process_index()])
            key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(
                jax.random.key(seed), SAMPLE_STREAM), self.epoch), b)
            result = sample_local(run, self.sample, batch_prompts, key)
            reward = score_images(scorer, result["images"], [p for p in batch_prompts for _ in range(2)])
            reward = reward.reshape(len(batch_prompts), 2, -1)
            preference.append(np.asarray(pareto_preference(reward[:, 0], reward[:, 1]), np.int32))
            latents.append(result["latents"].reshape(len(batch_prompts), 2, *result["latents"].shape[1:]))
            texts.append(result["text"])
            rewards.append(reward.reshape(len(batch_prompts) * 2, -1))
        preference = np.concatenate(preference)
        text = {k: np.concatenate([t[k] for t in texts]) for k in texts[0]}
        self.buffer = PairBuffer(np.concatenate(latents), text, _trivial_pairs(len(preference)), preference)
        self.batches = self._epoch_batches()
        self.record.update(global_stats(np.concatenate(rewards), "reward"),
                           tie_fraction=float(np.mean(np.all(preference == 0, axis=1))))

    def _epoch_batches(self) -> list[np.ndarray]:
        """``num_inner_epochs`` shuffled passes over this process's pairs, ``train_batch_size`` per device."""
        d3po = self.run.config.d3po
        per_batch = d3po.train_batch_size * self.run.setup.local_batch_devices
        rng = np.random.default_rng([self.run.config.train.seed, self.epoch, jax.process_index()])
        batches = []
        for _ in range(d3po.num_inner_epochs):
            order = rng.permutation(len(self.buffer.pairs))
            batches += [order[i:i + per_batch] for i in range(0, len(order), per_batch)]
        return batches

    def arrays(self) -> dict[str, jax.Array] | None:
        if self.epoch_done:
            return None  # the next epoch is sampled afresh
        local = {"latents": self.buffer.latents, "preference": self.buffer.preference,
                 **{f"text.{k}": v for k, v in self.buffer.text.items()}}
        return parallel.global_batch(local, self.run.mesh)

    def _arrays_target(self) -> dict[str, jax.ShapeDtypeStruct]:
        setup, d3po = self.run.setup, self.run.config.d3po
        shapes = d3po_shapes(setup, d3po.pairs_per_epoch * setup.batch_devices)
        return setup.batch_spec({"latents": shapes.pop("latents"), "preference": shapes.pop("preference"),
                                 **{f"text.{k}": v for k, v in shapes.items()}})

    def _from_arrays(self, arrays: dict[str, jax.Array]) -> PairBuffer:
        local = {k: parallel.local_rows(v, self.run.mesh) for k, v in arrays.items()}
        text = {k.removeprefix("text."): v for k, v in local.items() if k.startswith("text.")}
        return PairBuffer(local["latents"], text, _trivial_pairs(len(local["preference"])), local["preference"])


def _trivial_pairs(count: int) -> np.ndarray:
    """Pair i is members 0 and 1 of group i (online sampling makes one pair per prompt)."""
    return np.stack([np.arange(count), np.zeros(count, int), np.ones(count, int)], 1)


def sample_local(run: Run, sample, prompts: list[str], key: jax.Array) -> dict:
    """Sample this process's ``prompts`` with the compiled ``sample``; this process's rows, on the host."""
    text = text_inputs(run.components, prompts, run.config.d3po.resolution)
    result = sample(run.state.params, run.frozen, parallel.global_batch(text, run.mesh), key)
    return {"text": text, **{k: parallel.local_rows(v, run.mesh) for k, v in result.items()}}


def evaluate(run: Run, sample_one, prompts: list[str], scorer, epoch: int) -> dict[str, float]:
    """Mean/std reward of one fresh image each for ``eval_batch_size`` prompts per device; the prompts and the
    noise are the same at every evaluation of the run. Process 0 also keeps its images and their rewards."""
    count = run.config.d3po.eval_batch_size * run.setup.local_batch_devices
    batch_prompts = draw_prompts(prompts, count, [run.config.train.seed, EVAL_STREAM, jax.process_index()])
    key = jax.random.fold_in(jax.random.key(run.config.train.seed), EVAL_STREAM)
    result = sample_local(run, sample_one, batch_prompts, key)
    rewards = score_images(scorer, result["images"], batch_prompts)
    if jax.process_index() == 0:
        write_eval_samples(run.run_dir / "eval" / f"epoch_{epoch:04d}", result["images"], batch_prompts, rewards)
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


def train(config: Config, *, out=None) -> TrainResult:
    """Run (or continue) D3PO with the reward proxy ``d3po.reward``."""
    d3po = config.d3po
    prompts, scorer = load_prompts(config), scorer_from_config(config.d3po.reward, config.scorers, "d3po.reward")
    steps_per_epoch = d3po.pairs_per_epoch // d3po.train_batch_size * d3po.num_inner_epochs
    with Run(config, total_steps=d3po.num_epochs * steps_per_epoch, out=out) as run:  # mesh → load → state
        setup = run.setup  # compile
        update = run.compile(update_program(setup))
        sample = run.compile(sampler_program(setup, d3po.sample_batch_size * setup.batch_devices, 2, "sample"))
        sample_one = None  # the evaluation sampler, compiled only when the run evaluates
        if d3po.eval_every:
            sample_one = run.compile(sampler_program(setup, d3po.eval_batch_size * setup.batch_devices, 1, "evaluate"))
        data = OnlinePairs(run, sample)  # data, at the checkpoint's position
        pairs_per_step = config.pairs_per_step(setup.batch_devices)
        with run.loop(data) as loop:  # loop
            for _ in range(data.epoch, d3po.num_epochs):
                if not data.taken:
                    if itstime(data.epoch, d3po.eval_every):
                        data.record.update(evaluate(run, sample_one, prompts, scorer, data.epoch))
                    data.start_epoch(prompts, scorer)
                for rows in data.remaining():
                    run.state, metrics = update(run.state, run.frozen, data.global_batch(rows))
                    record = data.step_taken(jax.device_get(metrics))
                    show = record is not None and itstime(data.epoch, d3po.log_every, d3po.num_epochs - 1)
                    if loop.end_step(float(metrics["loss"]), record, pairs=pairs_per_step, show=show):
                        break
                if loop.stopping:
                    break
                data.next_epoch()
            if not loop.stopping and d3po.eval_every:
                run.log.write(run.step, {"epoch": d3po.num_epochs, **evaluate(run, sample_one, prompts, scorer,
                                                                              d3po.num_epochs)},
                              pairs_per_second=None, show=True)
            return run.finish(loop)  # save, export


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
    if config.objective != "d3po":
        raise ConfigError(f"config: dpojax d3po sample needs objective 'd3po', got {config.objective!r}")
    d3po = config.d3po
    if config.model.pretrained is not None:  # the round records where its model is, from anywhere
        config = apply_overrides(config.to_dict(), [f"model.pretrained={Path(config.model.pretrained).absolute()}"])
    seed = d3po.seed if d3po.seed is not None else secrets.randbits(31)
    prompts = draw_prompts(load_prompts(config), d3po.round_prompts, [seed])
    k = d3po.images_per_prompt
    setup = Setup.build(config)
    if setup.components.lora is None:  # the sampler needs no reference (with LoRA it is the adapters' base)
        setup = dataclasses.replace(setup, frozen={n: v for n, v in setup.frozen.items() if n != "reference"})
    per_call = d3po.sample_batch_size * setup.batch_devices
    sample = make_sampler(setup, k)
    timesteps = ddim_timesteps(setup.components.schedule, d3po.num_steps)
    chunks = []
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start:start + per_call]
        padded = chunk + [chunk[-1]] * (per_call - len(chunk))  # fixed shapes: one compiled program
        text = parallel.global_batch(text_inputs(setup.components, padded, d3po.resolution), setup.mesh)
        result = sample(setup.params, setup.frozen, text, jax.random.fold_in(jax.random.key(seed), start))
        chunks.append({name: np.asarray(jax.device_get(v))[:len(chunk) * k].reshape(len(chunk), k, *v.shape[1:])
                       for name, v in result.items()})
        print(f"sampled {min(start + per_call, len(prompts))}/{len(prompts)} prompts", file=out, flush=True)
    merged = {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
    arrays = {"latents": merged["latents"], "log_probs": merged["log_probs"],
              "timesteps": np.ascontiguousarray(np.broadcast_to(timesteps, (len(prompts), len(timesteps))),
                                                np.int32)}
    meta = {"config": config.to_dict(), "seed": seed, "unet_config": setup.components.unet_config}
    path = write_round(out_dir, Round(prompts, merged["images"], arrays, meta))
    print(f"wrote round {path} ({len(prompts)} prompts × {k} images); label it, then run "
          f"`dpojax d3po train {path}`", file=out, flush=True)
    return path


class RoundPairs(EpochPairs):
    """A labeled round's pairs, ``num_epochs`` shuffled passes; every process reads the round folder and takes
    its rows of each global batch."""

    def __init__(self, run: Run, buffer: PairBuffer):
        super().__init__(run)
        self.buffer = buffer
        self.per_step = run.config.pairs_per_step(run.setup.batch_devices)
        self.batches = self._epoch_batches()

    def next_epoch(self) -> None:
        super().next_epoch()
        self.batches = self._epoch_batches()

    def _epoch_batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.run.config.train.seed, self.epoch])
        order = rng.permutation(len(self.buffer.pairs))
        order = np.concatenate([order, order[:(-len(order)) % self.per_step]])  # wrap: every pair trains
        local = self.per_step // jax.process_count()
        first = jax.process_index() * local
        return [order[i + first:i + first + local] for i in range(0, len(order), self.per_step)]


def train_round(round_dir: str | Path, overrides: list[str] = (), *, out=None) -> TrainResult:
    """Train on a labeled round: starting policy and frozen reference are the model that sampled it."""
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
    pairs, preference = label_pairs(labels.scores, labels.labeled)
    if not len(pairs):
        raise ValueError(f"{round_dir}: no labeled pair to train on ({int(labels.labeled.sum())} of "
                         f"{len(round_.prompts)} prompts labeled by {len(labels.annotators)} annotators, "
                         f"every labeled pair ties)")
    d3po = config.d3po
    latents = _check_trajectories(round_, config, read_pipeline_folder(config.model.pretrained).schedule, round_dir)
    steps_per_epoch = -(-len(pairs) // config.pairs_per_step(parallel.batch_devices(parallel.make_mesh(
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor))))
    with Run(config, total_steps=d3po.num_epochs * steps_per_epoch, out=out) as run:  # mesh → load → state
        text = text_inputs(run.components, list(round_.prompts), d3po.resolution)
        data = RoundPairs(run, PairBuffer(latents, text, pairs, preference))  # data, at the checkpoint's position
        run.log.print(f"round {round_dir}: {len(pairs)} labeled pairs from {int(labels.labeled.sum())} prompts "
                      f"({len(labels.annotators)} annotators), {steps_per_epoch} steps per epoch")
        update = run.compile(update_program(run.setup))  # compile
        with run.loop(data) as loop:  # loop
            for _ in range(data.epoch, d3po.num_epochs):
                for rows in data.remaining():
                    run.state, metrics = update(run.state, run.frozen, data.global_batch(rows))
                    record = data.step_taken(jax.device_get(metrics))
                    show = record is not None and itstime(data.epoch, d3po.log_every, d3po.num_epochs - 1)
                    if loop.end_step(float(metrics["loss"]), record, pairs=data.per_step, show=show):
                        break
                if loop.stopping:
                    break
                data.next_epoch()
            result = run.finish(loop)  # save, export
        if result.final is not None:
            run.log.print(f"next round: dpojax d3po sample CONFIG --out NEXT_ROUND model.pretrained={result.final}")
        return result


def _check_trajectories(round_: Round, config: Config, schedule, round_dir: Path) -> np.ndarray:
    """The round's (P, k, T+1, C, h, w) latents, checked against its prompts, images and sampling settings."""
    latents = round_.arrays.get("latents")
    num_prompts, k = round_.images.shape[:2]
    steps = config.d3po.num_steps
    if latents is None or latents.ndim != 6 or latents.shape[:3] != (num_prompts, k, steps + 1):
        got = "none" if latents is None else str(latents.shape)
        raise ValueError(f"{round_dir}/trajectories.safetensors: 'latents' must be ({num_prompts}, {k}, "
                         f"{steps + 1}, C, h, w) for d3po.num_steps={steps}, got {got}")
    stored = round_.arrays.get("timesteps")
    if stored is None or not np.array_equal(stored, np.broadcast_to(ddim_timesteps(schedule, steps), stored.shape)):
        raise ValueError(f"{round_dir}/trajectories.safetensors: 'timesteps' do not match the {steps}-step DDIM "
                         f"schedule of {config.model.pretrained}")
    return np.asarray(latents, np.float32)
