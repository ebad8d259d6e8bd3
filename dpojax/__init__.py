"""dpojax: Diffusion-DPO and D3PO preference training for Stable Diffusion in JAX/Flax NNX."""

import flax as _flax

# Parameters are created unsharded; dpojax.parallel places them on the mesh from their logical axis names. The
# process-wide config default, not nnx.use_eager_sharding, which holds only in the thread that calls it.
_flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
