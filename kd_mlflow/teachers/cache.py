"""Teacher outputs computed once per data stream.

The trainings of one process often run the same frozen teacher on the same batches:
kdparam's grid cells, allkd's students, a benchmark's modes of one seed (kd, triplet,
dkd, dist, takd's first link and multikd's members all see the same batches when they
share the seed, the training split and the batch size). Inside a :func:`session` (the
strategies and the benchmark open one) every training keeps its teachers' outputs per
(pass over the data, batch); a later training whose key matches reads them instead of
running the teacher again.

**The key** of a stream of batches: a sha256 of the training split's images and labels,
the batch generator's state before the first pass (the seed), batch size, shuffling,
augmentation and normalisation (the dataset's crop, flip, mean and std), the data-parallel
shard, the device, the autocast precision, ``compile``, torch's thread count and version.
Entries are keyed further by the teacher's digest (its class and every state-dict tensor:
name, dtype, shape, strides and bytes), the pass and the batch index. Another teacher,
seed, subset, batch size, precision or device is another key: nothing is shared.

**Exactness.** A teacher is a frozen eval-mode module: on the same batch tensor, with the
same weights, device, autocast, layout and threads, its forward gives the same numbers
bit for bit. The key pins all of that. Reuse also requires that the tensor a distiller
hands to the teacher *is* the batch the trainer drew (``x is batch``): a method that
feeds the teacher something else (uda's clean + RandAugment concatenation) runs it as
before. As a guard against a key that misses something, every entry holds a fingerprint
of its batch (its shape and two position-weighted sums of the float bits as int64: exact
integer arithmetic, independent of the reduction order); a read compares it with the
batch at hand and a mismatch raises :class:`TeacherCacheMismatch`, never reuses (on CPU
at that step; on an accelerator at the end of the pass, to keep the step free of syncs).

**Memory.** Entries stay on the training device: a batch's logits (and the pooled
embedding when a method asks for it), e.g. 55,000 Fashion-MNIST images x 20 epochs x 10
classes x 4 bytes = 44 MB per teacher. A session holds at most ``max_mb`` (1024 MB); when
an entry would not fit, the least recently used *other* streams are dropped, and if it
still does not fit the stream stops growing (said once on stderr): the rest of its
batches run the teacher as without a cache. The benchmark empties the cache when the seed
changes (pairs of another seed never share a batch); a session's end frees everything.

Stage feature maps are not cached (too large): the methods that need them (oh, ab's
first phase, pkd, sfd) run their teacher every step, as do rkd and crd, which call
``teacher.features`` themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections import OrderedDict
from dataclasses import dataclass

import torch

MAX_MB = 1024
_active: "TeacherCache | None" = None


class TeacherCacheMismatch(RuntimeError):
    """A cached teacher output was about to be used for a batch it was not computed on."""


@dataclass
class _Entry:
    shape: tuple
    fingerprint: torch.Tensor  # int64 [2], on the training device
    logits: torch.Tensor
    embedding: torch.Tensor | None = None


class _Store:
    """The entries of one stream key: {(teacher digest, pass, batch): _Entry}."""

    def __init__(self, key: str):
        self.key = key
        self.entries: dict = {}
        self.nbytes = 0
        self.full = False


class TeacherCache:
    """A session's streams, least recently used first, within ``max_mb`` in all."""

    def __init__(self, max_mb: float = MAX_MB):
        self.max_mb = max_mb
        self.max_bytes = int(max_mb * 2 ** 20)
        self.streams: OrderedDict[str, _Store] = OrderedDict()
        self.nbytes = 0
        self.sessions: list[Counts] = []  # the open sessions, outermost first: each counts its trainings

    def store(self, key: str) -> _Store:
        if key not in self.streams:
            self.streams[key] = _Store(key)
        self.streams.move_to_end(key)
        return self.streams[key]

    def clear(self) -> None:
        """Drop every stream (the counters stay)."""
        self.streams.clear()
        self.nbytes = 0

    def reserve(self, store: _Store, nbytes: int) -> bool:
        """Room for ``nbytes`` more in ``store``, dropping other streams (least recently
        used first) if needed -> whether the bytes fit."""
        if store.full:
            return False
        for key in [k for k in self.streams if k != store.key]:
            if self.nbytes + nbytes <= self.max_bytes:
                break
            self.nbytes -= self.streams.pop(key).nbytes
        if self.nbytes + nbytes > self.max_bytes:
            store.full = True
            print(f"note: the teacher cache is full ({self.max_mb:g} MB); the teacher runs on every remaining "
                  f"batch of this data stream (-P teacher_cache=false turns the cache off)", file=sys.stderr)
            return False
        store.nbytes += nbytes
        self.nbytes += nbytes
        return True


class Counts:
    """Teacher forwards run (computed) and read from the cache instead (reused)."""

    def __init__(self, cache: TeacherCache | None = None):
        self.cache = cache
        self.computed = 0
        self.reused = 0

    def metrics(self) -> dict:
        return {"teacher_forwards_computed": self.computed, "teacher_forwards_reused": self.reused}


@contextlib.contextmanager
def session(enabled: bool = True, max_mb: float = MAX_MB):
    """The trainings started inside the block share one cache (the enclosing session's
    when one is open: a kdparam inside a benchmark) -> this block's Counts, whose
    ``cache`` is the shared TeacherCache; None when ``enabled`` is false. The outermost
    session's end frees every entry."""
    global _active
    if not enabled:
        yield None
        return
    outermost = _active is None
    if outermost:
        _active = TeacherCache(max_mb)
    counts = Counts(_active)
    _active.sessions.append(counts)
    try:
        yield counts
    finally:
        counts.cache.sessions.remove(counts)
        if outermost:
            _active.clear()
            _active = None


# ------------------------------------------------------------------ keys
def _hash_tensor(h, t: torch.Tensor) -> None:
    h.update(f"{t.dtype}|{tuple(t.shape)}|{t.stride()}|".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def module_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's class, mode and every state-dict tensor (name, dtype, shape,
    strides, bytes): the same digest means the same forward on the same input."""
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}|{module.training}|".encode())
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        _hash_tensor(h, tensor)
    return h.hexdigest()


def stream_key(trainer) -> str:
    """What decides the training batches and the teacher's numbers on them (see the
    module docstring); read from the trainer's own batches before their first pass."""
    batches, split = trainer.train_batches, trainer.data.train
    h = hashlib.sha256()
    for t in (split.x, split.y, batches.generator.get_state(), batches.mean, batches.std):
        _hash_tensor(h, t)
    h.update(repr((trainer.data.info, batches.batch_size, batches.shuffle, batches.augment, batches.channels_last,
                   batches.rank, batches.world_size, str(batches.device), str(trainer.amp_dtype),
                   bool(trainer.cfg.compile), torch.get_num_threads(), torch.__version__)).encode())
    return h.hexdigest()


_PIXEL_WEIGHTS: dict = {}
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(x: torch.Tensor) -> torch.Tensor:
    """int64 [2]: sums over the batch of each float's bits (as two 16-bit halves) weighted
    by its position in the image, and the same per image weighted by its place in the
    batch. Integer sums are exact whatever the order of the reduction; nothing overflows
    below 2^28 values per batch (weights < 252, halves < 2^16; 4096 CIFAR images: 2^23.6)."""
    bits = x.view(_SAME_SIZE_INT[x.element_size()]).to(torch.int64)  # same element size: any strides
    values = (bits & 0xFFFF) + 7 * ((bits >> 16) & 0xFFFF)
    shape = tuple(x.shape[1:])
    key = (shape, x.device)
    if key not in _PIXEL_WEIGHTS:
        n = x[0].numel()
        _PIXEL_WEIGHTS[key] = (torch.arange(n, device=x.device) % 251 + 1).view(shape)
    per_image = (values * _PIXEL_WEIGHTS[key]).flatten(1).sum(1)
    image_weights = torch.arange(len(x), device=x.device) % 251 + 1
    return torch.stack([per_image.sum(), (per_image * image_weights).sum()])


# ------------------------------------------------------------------ one training's view
class Stream:
    """One training's access to the cache: the distiller asks it for teacher outputs
    (``outputs``); the trainer's batches tell it which batch is current (``at``)."""

    def __init__(self, cache: TeacherCache, store: _Store, digests: list, device: torch.device):
        self.cache, self.store, self.digests = cache, store, digests
        self.check_now = device.type == "cpu"  # elsewhere a comparison would sync the device each step
        self.position = None
        self.batch = None
        self._fingerprint = None
        self._mismatch = None  # device bool accumulated over a pass (accelerators)
        self.counts = Counts()  # this training's

    def at(self, position, batch) -> None:
        self.position, self.batch, self._fingerprint = position, batch, None

    def end_pass(self) -> None:
        self.at(None, None)
        if self._mismatch is not None:
            mismatch, self._mismatch = bool(self._mismatch), None
            if mismatch:
                self._raise("this pass used it: the training stops at its end")

    def _raise(self, consequence: str = "the training stops before using it"):
        raise TeacherCacheMismatch(
            f"a cached teacher output does not belong to the batch at hand (its fingerprint differs) although the "
            f"data stream's key matched; {consequence}. Run with -P teacher_cache=false and report this as a bug")

    def _current_fingerprint(self) -> torch.Tensor:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.batch)
        return self._fingerprint

    def _check(self, entry: _Entry) -> None:
        if entry.shape != tuple(self.batch.shape):
            self._raise()
        differs = (entry.fingerprint != self._current_fingerprint()).any()
        if self.check_now:
            if differs:
                self._raise()
        else:
            self._mismatch = differs if self._mismatch is None else self._mismatch | differs

    @staticmethod
    def _run(teacher, x, embedding: bool):
        if embedding:
            f = teacher.features(x)
            return f.logits, f.embedding
        return teacher(x), None

    def _count(self, reused: bool) -> None:
        for counts in (self.counts, *self.cache.sessions):
            if reused:
                counts.reused += 1
            else:
                counts.computed += 1

    def outputs(self, index: int, teacher, x: torch.Tensor, embedding: bool = False):
        """-> (logits, pooled embedding or None) of teacher ``index`` on ``x``: read from
        the cache when this batch of this stream was seen by the same teacher, else run."""
        if self.position is None or x is not self.batch:
            self._count(False)
            return self._run(teacher, x, embedding)
        key = (self.digests[index], *self.position)
        entry = self.store.entries.get(key)
        if entry is not None:
            self._check(entry)
            if not embedding or entry.embedding is not None:
                self._count(True)
                return entry.logits.clone(), (entry.embedding.clone() if embedding else None)
        logits, emb = self._run(teacher, x, embedding)
        self._count(False)
        if entry is not None:  # it lacked the embedding
            if self.cache.reserve(self.store, emb.nbytes):
                entry.embedding = emb.detach().clone()
        elif not self.store.full:
            fp = self._current_fingerprint()
            if self.cache.reserve(self.store, logits.nbytes + fp.nbytes + (emb.nbytes if emb is not None else 0)):
                # Copies: a consumer (or a CUDA graph's next replay) may reuse what it was handed.
                self.store.entries[key] = _Entry(tuple(x.shape), fp, logits.detach().clone(),
                                                 None if emb is None else emb.detach().clone())
        return logits, emb

    def metrics(self) -> dict:
        """The counters to log on the training's run ({} when no teacher went through the cache)."""
        return self.counts.metrics() if self.counts.computed or self.counts.reused else {}


class _PositionedBatches:
    """The trainer's training batches, telling ``stream`` which (pass, batch) each one is."""

    def __init__(self, batches, stream: Stream):
        self._batches = batches
        self._stream = stream
        self._passes = 0

    def __len__(self) -> int:
        return len(self._batches)

    def __getattr__(self, name):  # everything else is the batches' own (generator, global_size, ...)
        if name == "_batches":
            raise AttributeError(name)
        return getattr(self._batches, name)

    def __iter__(self):
        p, self._passes = self._passes, self._passes + 1
        for i, batch in enumerate(self._batches):
            self._stream.at((p, i), batch[0])
            yield batch
        self._stream.end_pass()


def attach(trainer, *, resumed: bool = False) -> Stream | None:
    """Give ``trainer``'s distiller a Stream of the open session (before ``fit``) -> it,
    or None: no session, ``teacher_cache`` off, no teacher, or a resumed run (its first
    pass is not the stream's first)."""
    distiller = trainer.distiller
    if _active is None or not trainer.cfg.teacher_cache or resumed or not len(distiller.teachers):
        return None
    store = _active.store(stream_key(trainer))
    stream = Stream(_active, store, [module_digest(t) for t in distiller.teachers], trainer.device)
    trainer.train_batches = _PositionedBatches(trainer.train_batches, stream)
    distiller.teacher_cache = stream
    return stream
