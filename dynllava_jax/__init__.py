"""dynllava_jax: Dynamic-LLaVA and efficient multimodal LLMs in JAX / Flax NNX."""
import flax

# Parameters carry logical axis names as metadata; we place them ourselves (eval_shape → shardings → jit
# init), so Flax must not try to shard each variable eagerly at creation.
flax.config.update('flax_always_shard_variable', False)

__version__ = '0.1.0'
