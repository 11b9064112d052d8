"""Prompt templates; "superni" and "long" are the ones the SAPT / O-LoRA reference code uses."""

from __future__ import annotations

from petmix.data.task import Task

TEMPLATES: dict[str, str] = {
    "superni": "Definition: {definition}\n\nNow complete the following example -\nInput: {input}\nOutput: ",
    "long": "{definition}\n{input}\nOutput: ",
    "plain": "{definition}\n\nInput: {input}\nOutput: ",
}


def format_prompt(task: Task, text: str) -> str:
    """The prompt for input `text` of `task` (the model's answer follows it)."""
    try:
        template = TEMPLATES[task.template]
    except KeyError:
        raise ValueError(f"unknown template {task.template!r}; known: {', '.join(TEMPLATES)}") from None
    prompt = template.format(definition=task.definition, input=text)
    # Generic folders often have no definition: don't start their prompts with blank lines.
    return prompt.lstrip("\n") if task.template == "plain" else prompt
