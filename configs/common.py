"""The size presets and the config-argument parser live in the package (`dynllava_jax/presets.py`); this
module re-exports them for config files written against `configs.common`."""
from dynllava_jax.presets import (  # noqa: F401
    llm_config, model_config, num_image_tokens, parse_arg, sparse_config, vision_config)
