"""Offline preference training (Diffusion-DPO, SFT and the pair-loss variants).

- `state`: the policy/reference/frozen parameter trees and their static graphs (`load_components`).
- `optim`: AdamW / Adafactor behind a global-norm clip, linear warmup then constant.
- `step`: the jitted step over the mesh (VAE + text encoders + policy/reference UNets + `losses.pair_loss`).
- `checkpoint`: orbax run checkpoints; `export`: checkpoint or live UNet -> diffusers folder.
- `metrics`: progress line and metrics.jsonl; `evaluate`: held-out implicit reward accuracy.
- `dpo`: the loop (`train`); `cli`: `dpojax train` / `dpojax export` (`register_cli`).

Nothing is imported here, so `import dpojax.train.cli` stays cheap.
"""
