"""Pick-a-Pic v2 preference pairs for Diffusion-DPO.

- `synth`: synthetic Pick-a-Pic-schema parquet shards whose preferred image is the brighter one
  (`write_synthetic_pickapic`).
- `pickapic`: the TFDS builder, parquet shards or a JSONL file of pairs -> winner-first array_record pairs
  (`prepare_pickapic`).
- `scored_pairs`: pairs from AI feedback, decided by a scorer (`dpojax.scorers`): shards relabeled by it
  (`relabel_pickapic`), or a model's samples scored and paired (`generate_pairs`). The human-feedback rounds
  of D3PO are `dpojax.feedback`.
- `pipeline`: the grain loader, sharded per JAX process, with a checkpointable iterator (`make_pair_loader`).
- `transforms`: per-pair decode, resize, crop, flip, caption dropout and SDXL time_ids.
- `cli`: the `dpojax data` commands (`register_cli`).

Nothing is imported here, so `import dpojax.data.cli` stays cheap (TFDS and grain load only when used).
"""
