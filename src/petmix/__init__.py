"""petmix: continual and multi-task learning of language models with parameter-efficient tuning."""

__version__ = "0.1.0"


def load(run_dir, model=None):
    """Load a finished training run: ``petmix.load(RUN).generate([...])`` (see petmix.api)."""
    from petmix.api import load as _load

    return _load(run_dir, model)
