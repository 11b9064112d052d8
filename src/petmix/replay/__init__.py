"""Generative replay: pseudo task inputs from a per-task generator (SAPT)."""

from petmix.replay.generator import (
    DROP_REASONS,
    GeneratorConfig,
    generate_pseudo_inputs,
    generator_target,
    keep_count,
    load_pseudo_info,
    load_pseudo_inputs,
    parse_generation,
    save_pseudo_inputs,
    select_pseudo_inputs,
)

__all__ = [
    "DROP_REASONS",
    "GeneratorConfig",
    "generate_pseudo_inputs",
    "generator_target",
    "keep_count",
    "load_pseudo_info",
    "load_pseudo_inputs",
    "parse_generation",
    "save_pseudo_inputs",
    "select_pseudo_inputs",
]
