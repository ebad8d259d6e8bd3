"""Training metrics: a progress line, ``metrics.jsonl`` and TensorBoard events in the run folder, optionally W&B.

TensorBoard events are written with ``tensorboardX`` (a small dependency; the ``tensorboard`` package itself
pulls in TensorFlow's protobuf tooling and is only needed to view them).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np

from dpojax.config import LoggingConfig

PROGRESS_KEYS = (("loss", "loss {:.4f}"), ("implicit_acc", "acc {:.3f}"), ("reward_mean", "reward {:.4g}"),
                 ("eval_reward_mean", "eval reward {:.4g}"), ("grad_norm", "|g| {:.3g}"), ("lr", "lr {:.3g}"))


def mean_metrics(micro_metrics: list[dict]) -> dict[str, float]:
    """Average per-micro-batch metrics over gradient accumulation (a key missing in some is averaged over
    the micro-batches that have it: ``grad_norm`` and ``lr`` exist only on the last)."""
    keys = {k for m in micro_metrics for k in m}
    return {k: float(sum(float(m[k]) for m in micro_metrics if k in m)
                     / sum(1 for m in micro_metrics if k in m)) for k in sorted(keys)}


def clock(seconds: float) -> str:
    """``H:MM:SS`` (hours unbounded), as a progress bar prints durations."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def progress_line(step: int, total: int, metrics: dict[str, float], pairs_per_second: float | None,
                  elapsed: float | None = None, remaining: float | None = None) -> str:
    """``elapsed``: seconds this process has trained; ``remaining``: the estimate for the steps left."""
    parts = [f"step {step}/{total}"]
    parts += [fmt.format(metrics[k]) for k, fmt in PROGRESS_KEYS if k in metrics]
    if pairs_per_second is not None:
        parts.append(f"{pairs_per_second:.2f} pairs/s")
    if elapsed is not None:
        parts.append(f"elapsed {clock(elapsed)}" + ("" if remaining is None else f", ETA {clock(remaining)}"))
    return " | ".join(parts)


class MetricsLog:
    """Writes one JSON object per logged optimizer step and prints a progress line.

    On resume, records of steps after the resumed checkpoint (written before a crash) are dropped, so the
    file reads as one uninterrupted run. In a multi-process run only process 0 writes and prints; the others'
    log is silent (every process computes the same replicated metrics).
    """

    def __init__(self, run_dir: str | Path, config: LoggingConfig, *, total_steps: int, resume_step: int,
                 run_config: dict, out=sys.stdout):
        self.primary = jax.process_index() == 0
        self.tensorboard = self.wandb = None
        if not self.primary:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.out = out
        self._drop_after(resume_step)
        self.tensorboard = self._open_tensorboard() if config.tensorboard else None
        self.wandb = self._open_wandb(config, run_config) if config.wandb else None

    def _drop_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def _open_tensorboard(self):
        from tensorboardX import SummaryWriter

        return SummaryWriter(str(self.path.parent / "tensorboard"))

    def _open_wandb(self, config: LoggingConfig, run_config: dict):
        try:
            import wandb
        except ImportError:
            self.print("logging.wandb: wandb is not installed; not logging to W&B")
            return None
        return wandb.init(project=config.wandb_project, name=config.run_name, config=run_config,
                          dir=str(self.path.parent))

    def print(self, line: str) -> None:
        if self.primary:
            print(line, file=self.out, flush=True)

    def write(self, step: int, metrics: dict[str, float], *, pairs_per_second: float | None,
              show: bool, elapsed: float | None = None, remaining: float | None = None) -> None:
        """One record of ``step``; ``show`` also prints the progress line (with ``elapsed`` and the estimate
        of the ``remaining`` seconds, which stay out of the record: a resumed run's records equal an
        uninterrupted one's)."""
        if not self.primary:
            return
        record = {"step": step, "time": time.time(), **metrics}
        if pairs_per_second is not None:
            record["pairs_per_second"] = pairs_per_second
        with self.path.open("a") as f:
            f.write(json.dumps({k: _json_number(v) for k, v in record.items()}) + "\n")
        if self.tensorboard is not None:
            for k, v in metrics.items():
                self.tensorboard.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if show:
            self.print(progress_line(step, self.total_steps, metrics, pairs_per_second, elapsed, remaining))

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        """A uint8 (H, W, 3) image to TensorBoard (and W&B) at ``step``."""
        if self.tensorboard is not None:
            self.tensorboard.add_image(name, image, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(image)}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _json_number(value):
    """NaN/inf as strings, so the file stays strict JSON."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value
