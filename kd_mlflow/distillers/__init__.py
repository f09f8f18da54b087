"""One file per method family; each defines a Distiller subclass."""

from .base import Distiller, NoKD

__all__ = ["Distiller", "NoKD"]
