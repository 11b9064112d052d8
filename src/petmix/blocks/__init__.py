"""PET block kinds. Each kind holds a pool of blocks (one per task) mixed by per-input weights."""

from petmix.blocks.lora import LoRAConfig, LoRAPool, PooledLoRALinear

__all__ = ["LoRAConfig", "LoRAPool", "PooledLoRALinear"]
