"""Progressive Prompts (Razdaibiedina et al., ICLR 2023): a new prompt per task; task t trains its prompt
after the frozen prompts of tasks 1..t-1, concatenated (the router kind ``progressive``); the task id
picks how many prompts at test."""

from __future__ import annotations

from petmix.methods.base import Method, register_method

register_method(Method(
    "prog-prompt", "progressive", True, block="prompt", combine="concat",
    summary="a new prompt per task; task t trains its prompt after the frozen prompts of tasks 1..t-1, "
            "concatenated; the task id picks how many prompts at test",
    paper="Razdaibiedina et al., ICLR 2023 (Progressive Prompts)"))
