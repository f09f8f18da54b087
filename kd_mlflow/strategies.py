"""Multi-stage modes: several trainings composed as nested MLflow runs.

A strategy never copies the training loop. Every stage is one ``train_student`` call
inside a child run (``train_child``); the parent run records the stages side by side
(metrics, a table artifact, a seaborn figure), selects a student by validation
accuracy and registers it under the run's model name.

Each strategy is a callable object with ``prepare(cfg)``, which ``runner.run`` calls
before the data is loaded and before any MLflow run exists, so a bad input costs a
one-line ConfigError and leaves no half-made runs behind.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import Config, ConfigError
from .methods.base import NoKD
from .methods.kd.distiller import HintonKD
from .models import ARCHITECTURES, is_known_architecture
from .runner import Runtime, TrainResult, run_tags, train_student
from .tracking.cleanup import release_workdir
from .teachers import load_teacher, teacher_source


# ----------------------------------------------------------------- shared step
def train_child(parent_cfg: Config, child_cfg: Config, distiller_cls, data, teachers: list, tracker,
                rt: Runtime, *, run_name: str, stage: str, teacher: str, teacher_meta: dict | None = None,
                register: bool = False, extra_tags: dict | None = None) -> TrainResult:
    """One stage of a strategy: ``child_cfg`` trained in a run nested under the parent.

    The child logs its own procedure's params (``child_cfg.params()``) and is tagged
    with ``parent_mode`` so comparisons can tell it from a top-level run of the same mode.
    """
    tags = {**run_tags(child_cfg, rt, teacher), "parent_mode": parent_cfg.mode, "stage": stage, **(extra_tags or {})}
    with tracker.child(run_name, tags=tags) as child:
        child.log_params(child_cfg.params())
        result = train_student(child_cfg, distiller_cls, data, teachers, child, rt, teacher_meta=teacher_meta,
                               register=register, desc=f"{parent_cfg.mode} {stage}")
    release_workdir(result.run_id)  # the child is closed, FINISHED
    return result


def _kd_child_cfg(cfg: Config, **changes) -> Config:
    """A Hinton-KD stage of ``cfg``; the child never registers under the parent's name."""
    return cfg.replace(**{"mode": "kd", "registered_model": "", **changes})


def _frozen(model):
    """A private, eval-mode copy of a trained network to serve as the next teacher
    (the Distiller freezes and moves its teachers; the caller's result stays intact)."""
    return copy.deepcopy(model).eval()


def _finish(cfg: Config, tracker, best: TrainResult, summary: dict) -> TrainResult:
    """Log the selected student's numbers on the parent, register it, and describe it."""
    selected = {"test_acc": best.test_acc, "test_acc_last": best.test_acc_last, "test_correct": best.test_correct,
                "test_images": best.test_images}
    tracker.log_metrics({**{k: v for k, v in selected.items() if v is not None}, "best_val_acc": best.best_val_acc,
                         "best_epoch": best.best_epoch, **summary})
    tracker.set_tags({"selected_run_id": best.run_id or ""})
    version = tracker.register(best.model_uri, cfg.model_name, strategy_card(cfg, best.card, tracker.run_id)) \
        if best.model_uri and cfg.registers else None
    return TrainResult(tracker.run_id, best.test_acc, best.best_val_acc, best.best_epoch,
                       cfg.model_name if version is not None else None, version, best.checkpoint,
                       best.history, best.model_uri, best.model, best.test_acc_last, best.test_correct,
                       best.test_images, best.card)


def strategy_card(cfg: Config, card: dict | None, run_id: str | None) -> dict | None:
    """The selected stage's model card as the strategy's registered version tells it: the
    version is ``cfg.mode``'s (takd, kdparam, allkd), trained as the stage it names."""
    if not card:
        return card
    stage = card["tags"]["mode"]
    metadata = {**card["metadata"], "kd_mlflow": {**card["metadata"]["kd_mlflow"], "mode": cfg.mode,
                                                  "stage_mode": stage}}
    description = (f"Selected by kd-mlflow mode `{cfg.mode}` (run {run_id or '(untracked)'}), "
                   f"from its stage below.\n\n" + card["description"])
    return {**card, "metadata": metadata, "description": description,
            "tags": {**card["tags"], "mode": cfg.mode, "stage_mode": stage}}


def _train_cells(cfg: Config, cells: list, tracker) -> tuple[dict, dict]:
    """A strategy's cells trained through the execution layer in this process, nested under
    ``tracker`` -> ({index: Outcome}, teacher cache counters); any failed cell fails the
    strategy, naming the first."""
    from .execution import Job, Options, execute

    outcomes = {}

    def done(cell, out) -> None:
        outcomes[cell.index] = out
        if out.adopted:
            print(f"{cfg.mode}: {cell.name} had finished in a stopped run of this {cfg.mode}: run {out.adopted} "
                  f"(test_acc {out.test_acc:.2f}%) now belongs to this one, not trained again")

    counts = execute(cells, Job(tracker.run_id, cfg.mode, parent=tracker, adopt_finished=True), Options(),
                     on_done=done)
    failed = [f"{c.name}: {outcomes[c.index].error}" for c in cells if outcomes[c.index].error]
    if failed:
        raise RuntimeError(f"{cfg.mode}: {len(failed)} of {len(cells)} cells failed; the first: {failed[0]}")
    return outcomes, counts


def _cell_result(out) -> TrainResult:
    """A cell's execution.Outcome as the TrainResult _finish registers (no model in memory:
    the registered version is the cell's logged model)."""
    return TrainResult(out.run_id, out.test_acc, out.best_val_acc, out.best_epoch, None, None, Path(out.checkpoint),
                       [], out.model_uri, None, out.test_acc_last, out.test_correct, out.test_images, out.card)


def _best(results: list[TrainResult]) -> int:
    """Index of the best validation accuracy (the first one on a tie): never the test set."""
    return max(range(len(results)), key=lambda i: (results[i].best_val_acc, -i))


def _num(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


class Strategy:
    name = ""

    def prepare(self, cfg: Config) -> None:
        """Checks that need more than Config.validate; runs before any MLflow run exists."""

    def __call__(self, cfg: Config, data, teachers: list, metas: list, tracker, rt: Runtime) -> TrainResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<strategy {self.name}>"


# ----------------------------------------------------------------------- allkd
@dataclass
class TeacherPlan:
    spec: str            # as the user wrote it in -P teachers
    source: str | None   # checkpoint path / models:/ URI; None = train it first
    arch: str


class AllKD(Strategy):
    """One KD student per teacher (teachers without a checkpoint are trained first);
    the student with the best validation accuracy is selected and registered."""

    name = "allkd"

    def plan(self, cfg: Config, *, load: bool = False) -> list[tuple[TeacherPlan, object, dict]]:
        """-> [(plan, model or None, meta)]; every spec is resolved and, if it names a
        checkpoint, loaded and checked against the dataset."""
        out = []
        for spec in cfg.list_of("teachers"):
            looks_like_file = spec.startswith("models:/") or spec.endswith(".pt") or "/" in spec
            if not looks_like_file and not spec.startswith("pretrained:") and not is_known_architecture(spec):
                raise ConfigError(
                    f"teachers entry {spec!r} is neither a known architecture nor a checkpoint (.pt file, "
                    f"models:/ URI or pretrained:<name>); architectures: {', '.join(ARCHITECTURES)}"
                )
            try:
                source = teacher_source(cfg, spec)
            except ConfigError:
                if looks_like_file or spec.startswith("pretrained:"):
                    raise
                # An architecture without pretrained/<dataset>-<arch>.pt: trained in its own child run.
                out.append((TeacherPlan(spec, None, spec), None, {"arch": spec}))
                continue
            model, meta = load_teacher(source, cfg)
            out.append((TeacherPlan(spec, source, meta["arch"]), model if load else None, meta))
        return out

    def prepare(self, cfg: Config) -> None:
        self.plan(cfg)

    def __call__(self, cfg, data, teachers, metas, tracker, rt):
        """Teachers without a checkpoint are trained first, here; then the students are
        cells of the execution layer, each the run `train kd` from that teacher makes."""
        from .execution import Cell
        from .analysis.plots import teacher_vs_student

        planned, trained_here = [], {}
        for i, (plan, model, meta) in enumerate(self.plan(cfg), start=1):
            if plan.source is None:
                _, meta, teacher_uri, trained_here[i] = self._train_teacher(cfg, plan, i, data, tracker, rt)
                plan = TeacherPlan(plan.spec, teacher_uri, plan.arch)
            planned.append((plan, meta))
        cells = [Cell(i, _kd_child_cfg(cfg, teacher=plan.arch, teacher_checkpoint=plan.source or ""),
                      f"student-{i}-{cfg.student}-from-{plan.arch}",
                      {"parent_mode": cfg.mode, "stage": f"student {i}", "teacher_spec": plan.spec})
                 for i, (plan, _) in enumerate(planned, start=1)]
        # One cache: a teacher listed twice (or the same checkpoint under two names) runs once.
        outcomes, counts = _train_cells(cfg, cells, tracker)
        rows, results = [], []
        for cell, (plan, meta) in zip(cells, planned):
            i, res = cell.index, _cell_result(outcomes[cell.index])
            teacher_acc = _num(meta.get("test_acc"))
            rows.append({"index": i, "teacher_spec": plan.spec, "teacher_arch": plan.arch,
                         "teacher_source": plan.source or "", "teacher_trained_here": i in trained_here,
                         "teacher_run_id": trained_here.get(i, ""), "teacher_test_acc": teacher_acc,
                         "student_best_val_acc": res.best_val_acc, "student_test_acc": res.test_acc,
                         "student_best_epoch": res.best_epoch, "child_run_id": res.run_id})
            results.append(res)
            metrics = {f"student_{i}_val_acc": res.best_val_acc, f"student_{i}_test_acc": res.test_acc}
            if teacher_acc is not None:
                metrics[f"teacher_{i}_test_acc"] = teacher_acc
            tracker.log_metrics(metrics)

        best = _best(results)
        for row in rows:
            row["selected"] = row["index"] == best + 1
        tracker.log_dict(rows, "pairs.json")
        tracker.log_figure(teacher_vs_student(rows, f"allkd: {cfg.student} on {cfg.dataset}"),
                           "figures/teacher_vs_student.png")
        tracker.set_tags({"best_teacher": rows[best]["teacher_spec"]})
        return _finish(cfg, tracker, results[best], {"best_index": best + 1, **counts})

    def _train_teacher(self, cfg, plan: TeacherPlan, i: int, data, tracker, rt):
        """Train an architecture that has no checkpoint with the teacher procedure,
        register it as <dataset>-<arch>-teacher, and hand it over frozen."""
        registers = cfg.registers
        teacher_cfg = cfg.replace(mode="teacher", arch=plan.arch, epochs=cfg.teacher_epochs or cfg.epochs,
                                  registered_model=f"{cfg.dataset}-{plan.arch}-teacher" if registers else "",
                                  output="")
        res = train_child(cfg, teacher_cfg, NoKD, data, [], tracker, rt,
                          run_name=f"teacher-{i}-{plan.arch}", stage=f"teacher {i}", teacher="none",
                          register=registers, extra_tags={"teacher_spec": plan.spec})
        uri = f"models:/{res.registered_model}/{res.version}" if res.version is not None else (res.model_uri or "")
        if res.version is not None:
            print(f"allkd: trained teacher {plan.arch} registered as {uri}; pass it in -P teachers to reuse it",
                  file=sys.stderr)
        meta = {"arch": plan.arch, "dataset": cfg.dataset, "test_acc": res.test_acc,
                "best_val_acc": res.best_val_acc}
        return _frozen(res.model), meta, uri, res.run_id or ""


# --------------------------------------------------------------------- kdparam
class KDParam(Strategy):
    """Hinton KD over the grid temperatures x alphas, one child per cell; the cell with
    the best validation accuracy wins."""

    name = "kdparam"

    @staticmethod
    def grid(cfg: Config) -> tuple[list[float], list[float]]:
        """The grid axes, duplicates dropped (order kept) so each cell is trained once."""
        return (list(dict.fromkeys(cfg.floats_of("temperatures"))),
                list(dict.fromkeys(cfg.floats_of("alphas"))))

    def prepare(self, cfg: Config) -> None:
        self.grid(cfg)

    def __call__(self, cfg, data, teachers, metas, tracker, rt):
        """The grid's cells are cells of the execution layer: each is the run `train kd` with
        its temperature and alpha would make (bit-identical on CPU), nested under this one."""
        from .execution import Cell
        from .analysis.plots import kdparam_heatmap

        temperatures, alphas = self.grid(cfg)
        meta = metas[0] if metas else {}
        teacher_arch = meta.get("arch", cfg.teacher)
        source = teacher_source(cfg)
        n = len(temperatures) * len(alphas)
        cells = []
        for t in temperatures:
            for a in alphas:
                k = len(cells) + 1
                child_cfg = _kd_child_cfg(cfg, temperature=t, alpha=a, teacher=teacher_arch, teacher_checkpoint=source)
                cells.append(Cell(k, child_cfg, f"kd-T{t:g}-alpha{a:g}",
                                  {"parent_mode": cfg.mode, "stage": f"{k}/{n} T={t:g} alpha={a:g}"}))
        outcomes, counts = _train_cells(cfg, cells, tracker)
        results, rows = [], []
        for cell in cells:
            out = outcomes[cell.index]
            results.append(_cell_result(out))
            rows.append({"temperature": cell.cfg.temperature, "alpha": cell.cfg.alpha,
                         "best_val_acc": out.best_val_acc, "test_acc": out.test_acc, "best_epoch": out.best_epoch,
                         "child_run_id": out.run_id})

        best = _best(results)
        for i, row in enumerate(rows):
            row["selected"] = i == best
        t_best, a_best = rows[best]["temperature"], rows[best]["alpha"]
        tracker.log_dict(rows, "kdparam_grid.json")
        tracker.log_figure(kdparam_heatmap(rows, f"kdparam: {cfg.student} from {teacher_arch} on {cfg.dataset}"),
                           "figures/kdparam_heatmap.png")
        tracker.set_tags({"best_temperature": f"{t_best:g}", "best_alpha": f"{a_best:g}"})
        summary = {"best_temperature": t_best, "best_alpha": a_best, **counts}
        if "test_acc" in meta:
            summary["teacher_test_acc"] = float(meta["test_acc"])
        return _finish(cfg, tracker, results[best], summary)


# ------------------------------------------------------------------------ takd
def assistant_model_name(cfg: Config, arch: str) -> str:
    return f"{cfg.dataset}-{arch}-takd-assistant"


class TAKD(Strategy):
    """Teacher -> assistants -> student (Mirzadeh et al., 2020): each link distils the
    next architecture from the previous, frozen network. Assistants are registered
    under their own names; the final student under the run's model name."""

    name = "takd"

    def __call__(self, cfg, data, teachers, metas, tracker, rt):
        from .analysis.plots import takd_chain

        meta = dict(metas[0]) if metas else {}
        prev_model = teachers[0]  # the runner's frozen teacher; later links get a copy of the previous result
        prev_arch = meta.get("arch", cfg.teacher)
        prev_source = teacher_source(cfg)
        assistants = cfg.list_of("assistants")
        chain = [*assistants, cfg.student]
        rows = [{"link": 0, "arch": prev_arch, "role": "teacher", "source": prev_source,
                 "best_val_acc": _num(meta.get("best_val_acc")), "test_acc": _num(meta.get("test_acc")),
                 "child_run_id": "", "registered_model": ""}]
        metrics = {"teacher_test_acc": float(meta["test_acc"])} if "test_acc" in meta else {}
        res = None
        for i, arch in enumerate(chain, start=1):
            is_assistant = i <= len(assistants)
            role = "assistant" if is_assistant else "student"
            registers = is_assistant and cfg.registers
            child_cfg = _kd_child_cfg(cfg, student=arch, teacher=prev_arch, teacher_checkpoint=prev_source,
                                      registered_model=assistant_model_name(cfg, arch) if registers else "")
            res = train_child(cfg, child_cfg, HintonKD, data, [prev_model], tracker, rt,
                              run_name=f"link-{i}-{prev_arch}-to-{arch}", stage=f"link {i}/{len(chain)} {role}",
                              teacher=prev_arch, teacher_meta=meta, register=registers,
                              extra_tags={"link": str(i), "role": role})
            registered = (f"models:/{res.registered_model}/{res.version}" if res.version is not None else "")
            rows.append({"link": i, "arch": arch, "role": role, "source": registered or res.model_uri or "",
                         "best_val_acc": res.best_val_acc, "test_acc": res.test_acc, "child_run_id": res.run_id,
                         "registered_model": registered})
            metrics.update({f"link_{i}_test_acc": res.test_acc, f"link_{i}_val_acc": res.best_val_acc})
            tracker.log_metrics(metrics)
            metrics = {}
            if i < len(chain):
                prev_model = _frozen(res.model)
            prev_arch, prev_source = arch, rows[-1]["source"]
            meta = {"arch": arch, "dataset": cfg.dataset, "test_acc": res.test_acc, "best_val_acc": res.best_val_acc}

        tracker.log_dict(rows, "takd_chain.json")
        tracker.log_figure(takd_chain(rows, f"takd: {' -> '.join(r['arch'] for r in rows)} on {cfg.dataset}"),
                           "figures/takd_chain.png")
        return _finish(cfg, tracker, res, {"links": len(chain)})


allkd = AllKD()
kdparam = KDParam()
takd = TAKD()
