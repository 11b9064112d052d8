"""PET block kinds. Each kind holds a pool of blocks (one per task) mixed by per-input weights.

A pool offers: ``add_block()``, ``num_blocks``, ``block_parameters(i)``, ``model_inputs(batch, weights)``
(the model's keyword arguments with the mixture applied), ``clear()``, ``state_dict()`` and
``load_state_dict()``. The backbone pools (full fine-tuning, BitFit) have one block and ``reset()``.
"""

from petmix.blocks.bitfit import BitFitPool
from petmix.blocks.full import BackbonePool, FullConfig
from petmix.blocks.lora import LoRAConfig, LoRAPool, PooledLoRALinear
from petmix.blocks.prompt import PromptConfig, PromptPool

__all__ = ["BackbonePool", "BitFitPool", "FullConfig", "LoRAConfig", "LoRAPool", "PooledLoRALinear",
           "PromptConfig", "PromptPool"]
