"""Moved to :mod:`seg4diff_fast.reader.prompts` (the reader owns prompts and class-token positions); kept
so old imports work."""

from ..reader.prompts import PromptChunk, clean_name, content_limit, plan_prompts

__all__ = ["PromptChunk", "clean_name", "content_limit", "plan_prompts"]
