"""Progressive Prompts (Razdaibiedina et al., ICLR 2023): a new prompt per task; task t trains its prompt
after the frozen prompts of tasks 1..t-1, concatenated (the router kind ``progressive``); the task id
picks how many prompts at test."""

from __future__ import annotations

from petmix.methods.base import Method, register_method

register_method(Method(
    "prog-prompt", "progressive", True, block="prompt", combine="concat",
    tuned_lr=3e-2,  # docs/tuned.md: SuperNI, 60.00 at 3e-2 against 49.00 at 1e-2 and 51.00 at 1e-1
    summary="a new prompt per task; task t trains its prompt after the frozen prompts of tasks 1..t-1, "
            "concatenated; the task id picks how many prompts at test",
    paper="Razdaibiedina et al., ICLR 2023 (Progressive Prompts)"))
