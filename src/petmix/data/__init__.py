"""Task data: loaders for SuperNI / Long_Sequence (CL layout), generic folders and BIG-bench."""

from petmix.data.loaders import load_task, load_tasks
from petmix.data.streams import STREAMS, resolve_stream, stream_info
from petmix.data.task import METRICS, Example, Task
from petmix.data.templates import TEMPLATES, format_prompt

__all__ = [
    "METRICS",
    "STREAMS",
    "TEMPLATES",
    "Example",
    "Task",
    "format_prompt",
    "load_task",
    "load_tasks",
    "resolve_stream",
    "stream_info",
]
