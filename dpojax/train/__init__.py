"""Training: one harness under every objective, and the objectives themselves.

- `harness`: the setup (mesh, models, optimizer, state shardings) and the loop's services (stop agreement,
  cadence, finite check, checkpoints with the data position, sample grids, export) every trainer uses.
- `dpo`: offline Diffusion-DPO, its variants and SFT (`train`); `step`: its jitted step.
- `d3po`: online D3PO and the human-feedback rounds (`train`, `sample_round`, `train_round`); `d3po_step`: its
  jitted sampler and step.
- `state`: the trained state; `optim`: AdamW / Adafactor behind a global-norm clip, warmup then constant.
- `checkpoint`: orbax run checkpoints; `export`: checkpoint or live policy -> diffusers folder.
- `metrics`: progress line, metrics.jsonl, TensorBoard; `samples`: sample grids; `cli`: `dpojax train`,
  `dpojax d3po`, `dpojax export` (`register_cli`).

Nothing is imported here, so `import dpojax.train.cli` stays cheap.
"""
