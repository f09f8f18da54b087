"""torchvision classification networks as kd-mlflow students and teachers: ``tv-<name>``.

``tv-resnet50``, ``tv-mobilenet_v3_small``, ``tv-efficientnet_b0``: any classification
builder of ``torchvision.models``, built with ``weights=None`` (weights come from a
checkpoint file, never from the network). The name is ``tv-`` rather than
``torchvision:`` because the trained network's name becomes part of MLflow model names,
which refuse ``:``; a teacher, which names no model, may be written ``torchvision:<name>``
(kept as typed: ``mlflow run`` logs -P values as typed, and a resume compares them).

The network stays the torchvision module (``net``), so its state dict is exactly
torchvision's with a ``net.`` prefix and published weights load into it. Feature modes
need per-stage features and the pooled embedding: they are taken with forward hooks,
as torchdistill does, without touching the network:

- stages: the body's direct children (``layer1..4`` of a ResNet, the blocks of
  ``features`` elsewhere) are probed once with a small input; the last child before
  each drop in resolution ends a stage;
- for ResNets, a stage's feature is the *pre-ReLU* sum of its last block (the input
  of that block's final ReLU, made not in-place), like the CIFAR ResNets here; for
  other families the stage output as it is (after the activation);
- the embedding is the input of the last ``nn.Linear`` (the classifier).

The hooks do nothing unless ``features()`` is running, so ``forward`` is the plain
network (what is exported and served).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .base import Features

PREFIX = "tv-"
ALIAS = "torchvision:"
PROBE_SIZES = (64, 224)  # the probe input's side: small first; some networks (inception) need more


@functools.lru_cache(maxsize=1)
def torchvision_names() -> tuple:
    """The classification builders of torchvision.models (not detection, video, ...)."""
    import torchvision.models as tvm

    return tuple(tvm.list_models(module=tvm))


def torchvision_name(arch: str) -> str | None:
    """``tv-resnet18`` (or ``torchvision:resnet18``) -> ``resnet18``; None for other names."""
    for prefix in (PREFIX, ALIAS):
        if arch.startswith(prefix):
            return arch[len(prefix):]
    return None


def canonical(arch: str) -> str:
    """The architecture's name in model names: ``torchvision:resnet18`` -> ``tv-resnet18``."""
    return PREFIX + arch[len(ALIAS):] if arch.startswith(ALIAS) else arch


def is_torchvision_architecture(arch: str) -> bool:
    name = torchvision_name(arch)
    return name is not None and name in torchvision_names()


def _last_linear(net: nn.Module) -> tuple[str, nn.Linear]:
    found = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("the network has no nn.Linear classifier")
    return found[-1]


def _body(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of the children whose outputs are probed for stages."""
    features = getattr(net, "features", None)
    if isinstance(features, nn.Sequential):
        return [(f"features.{n}", m) for n, m in features.named_children()]
    head = {n for n, m in net.named_children() if m is _last_linear(net)[1] or
            isinstance(m, (nn.AdaptiveAvgPool2d, nn.Dropout)) or n in ("avgpool", "classifier", "fc", "head")}
    return [(n, m) for n, m in net.named_children() if n not in head]


class TorchvisionNet(nn.Module):
    """A torchvision classifier with the FeatureNet interface (features, stage_channels,
    embedding_dim, bn_before_relu), its stages taken through forward hooks."""

    def __init__(self, arch: str, num_classes: int, in_channels: int = 3):
        super().__init__()
        import torchvision.models as tvm

        name = torchvision_name(arch)
        if name not in torchvision_names():
            raise ValueError(f"unknown torchvision architecture {arch!r}; see torchvision.models.list_models()")
        if in_channels != 3:
            raise ValueError(f"torchvision architectures take 3-channel images, this dataset has {in_channels}; "
                             f"use them with cifar10, cifar100 or imagefolder")
        self.arch = PREFIX + name
        self.net = tvm.get_model(name, weights=None, num_classes=num_classes)
        self.classifier_name, classifier = _last_linear(self.net)
        self._capture: list | None = None
        self._embedding: torch.Tensor | None = None
        self._stage_modules, self._stage_bns = self._find_stages()
        for i, module in enumerate(self._stage_modules):
            self._hook_stage(i, module)
        classifier.register_forward_pre_hook(self._keep_embedding)
        self.stage_channels = self._probe_channels()

    # ------------------------------------------------------------- stages
    def _find_stages(self):
        body = _body(self.net)
        shapes = self._probe([m for _, m in body])
        ends = []
        for i, shape in enumerate(shapes):
            if shape is None or len(shape) != 4:
                continue
            following = next((s for s in shapes[i + 1:] if s is not None and len(s) == 4), None)
            if following is None or following[-1] < shape[-1]:
                ends.append(i)
        # The stem (a child whose resolution the next block halves straight away) is no stage
        # when there are enough others; the last four (at most) are kept, as in ResNets.
        ends = ends[-4:]
        modules = [body[i][1] for i in ends]
        bns = []
        for m in modules:
            norms = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
            bns.append(norms[-1] if norms else None)
        return modules, bns

    @torch.no_grad()
    def _probe(self, modules: list) -> list:
        shapes = [None] * len(modules)
        handles = [m.register_forward_hook(
            lambda _m, _i, out, k=k: shapes.__setitem__(k, tuple(out.shape) if torch.is_tensor(out) else None))
            for k, m in enumerate(modules)]
        was_training = self.net.training
        try:
            self.net.eval()  # no BatchNorm statistic moves
            for size in PROBE_SIZES:
                try:
                    self.net(torch.zeros(1, 3, size, size))
                    self.probe_size = size
                    break
                except RuntimeError:
                    if size == PROBE_SIZES[-1]:
                        raise
        finally:
            self.net.train(was_training)
            for h in handles:
                h.remove()
        return shapes

    def _probe_channels(self) -> list:
        with torch.no_grad():
            was_training = self.net.training
            self.net.eval()
            try:
                f = self.features(torch.zeros(1, 3, self.probe_size, self.probe_size))
            finally:
                self.net.train(was_training)
        return [int(s.shape[1]) for s in f.stages]

    def _hook_stage(self, index: int, module: nn.Module) -> None:
        last = module[-1] if isinstance(module, nn.Sequential) and len(module) else None
        relu = getattr(last, "relu", None)
        if isinstance(relu, nn.ReLU):
            # A ResNet block's last call of its ReLU is on the residual sum: its input is the
            # stage's pre-ReLU feature. Not in place, or the ReLU would overwrite it.
            relu.inplace = False
            pending: list = []

            def keep_input(_m, args):
                if self._capture is not None:
                    pending[:] = [args[0]]

            def stage_done(_m, _args, _out):
                if self._capture is not None:
                    self._capture[index] = pending[0]

            relu.register_forward_pre_hook(keep_input)
            module.register_forward_hook(stage_done)
            return

        def keep_output(_m, _args, out):
            if self._capture is not None:
                self._capture[index] = out

        module.register_forward_hook(keep_output)

    def _keep_embedding(self, _m, args):
        if self._capture is not None:
            self._embedding = args[0]

    # ---------------------------------------------------------- interface
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def features(self, x: torch.Tensor) -> Features:
        self._capture = [None] * len(self._stage_modules)
        try:
            logits = self.net(x)
            stages, embedding = list(self._capture), self._embedding
        finally:
            self._capture, self._embedding = None, None
        return Features(logits, stages, embedding.flatten(1))

    def forward_stages(self, x: torch.Tensor):
        f = self.features(x)
        return f.stages, f.embedding

    @property
    def classifier(self) -> nn.Linear:
        return self.net.get_submodule(self.classifier_name)

    @property
    def embedding_dim(self) -> int:
        return self.classifier.in_features

    def bn_before_relu(self):
        """The last BatchNorm of each stage (for ResNets the one on the residual branch
        before the sum whose ReLU follows)."""
        if any(bn is None for bn in self._stage_bns):
            raise ValueError(f"{self.arch} has a stage without BatchNorm; modes ab and oh need one per stage")
        return list(self._stage_bns)
