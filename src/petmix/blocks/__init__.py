"""PET block kinds. Each kind holds a pool of blocks (one per task) mixed by per-input weights.

A pool offers: ``add_block()``, ``num_blocks``, ``block_parameters(i)``, ``model_inputs(batch, weights)``
(the model's keyword arguments with the mixture applied), ``clear()``, ``state_dict()`` and
``load_state_dict()``.
"""

from petmix.blocks.lora import LoRAConfig, LoRAPool, PooledLoRALinear
from petmix.blocks.prompt import PromptConfig, PromptPool

__all__ = ["LoRAConfig", "LoRAPool", "PooledLoRALinear", "PromptConfig", "PromptPool"]
