"""Model: CLIP tower, projector, LLaMA decoder, keep-predictors, LLaVA composition."""
from dynllava_jax.model.llava import Llava, check_model_config, positions_from_mask

__all__ = ['Llava', 'check_model_config', 'positions_from_mask']
