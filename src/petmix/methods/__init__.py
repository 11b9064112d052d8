"""Methods: one module each (its options, hooks and registration); ``petmix.methods.base`` holds the
registry. Importing this package registers the built-in ones, in the order ``petmix methods`` lists them."""

# isort: off
from petmix.methods import sapt  # noqa: F401  (each module registers its methods)
from petmix.methods import sequential, reference, o_lora, ewc, replay, lwf, l2p, lfpt5, prog_prompt  # noqa: F401
from petmix.methods import single_task, spot, attempt  # noqa: F401
# isort: on
from petmix.methods.base import (
    METHODS,
    Method,
    StageHook,
    get_method,
    option_fields,
    register_method,
    setting,
)

__all__ = ["METHODS", "Method", "StageHook", "get_method", "option_fields", "register_method", "setting"]
