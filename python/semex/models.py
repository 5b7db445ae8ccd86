"""LOTUS's import path for models: ``from semex.models import LM`` works as
``from lotus.models import LM`` does."""
from .lm import LM, LMOutput, Usage

__all__ = ["LM", "LMOutput", "Usage"]
