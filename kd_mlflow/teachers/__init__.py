"""Frozen teachers: where they come from (``loading``: architectures, checkpoints, models:/
URIs, ``pretrained:`` names, and fine-tuning a new classifier head), the committed ones
(``pretrained``: pretrained/ and its manifest) and their outputs computed once per batch
stream (``cache``)."""

from .loading import PRETRAINED_DIR, finetune_heads, load_teacher, teacher_source

__all__ = ["PRETRAINED_DIR", "finetune_heads", "load_teacher", "teacher_source"]
