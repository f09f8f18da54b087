"""One folder per method: ``<name>/__init__.py`` declares it (a :class:`spec.Mode` named
``METHOD``; no torch import) and the module its ``target`` names implements it (a
:class:`base.Distiller` subclass, or a strategy). ``kd_mlflow.modes`` finds the folders
here and the ``kd_mlflow.methods`` entry points of other installed packages.

Shared pieces: ``spec`` (declarations), ``base`` (Distiller, NoKD), ``logits`` (Hinton's
KD term, logit standardization), ``features`` (stage pairing and connectors).
"""
