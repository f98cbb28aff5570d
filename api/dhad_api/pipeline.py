"""The Pipeline kind: the AceGPT recipe as one object (stages, evaluation gates, step caching, lineage).

A Pipeline lists stages in order; each is a template of one job kind (exactly one of `pretrain`, `sft`,
`rlaif`, `eval`), and a model may come from an earlier stage: inside a pipeline `fromJob` names a stage
(`{kind: SFTJob, name: sft}` is the stage called sft, which must be an SFTJob stage). `spec.defaults`
holds the shared parts (storage, image, resources, pod overrides, ...) once; a stage that sets one of
them replaces the default as a whole. A stage may carry a `gate`: an EvalJob of its output model with
conditions on the scores; a failed gate stops the pipeline and nothing is promoted.

Everything here is pure and shared: the operator (operator/dhad_operator/pipeline.py) and local mode
(trainer/dhad_trainer/local/pipeline.py) both drive `walk()`, which says, from the spec, the child jobs
seen so far and the step cache, which children should exist, what each stage's status is and how the
pipeline stands. Child jobs are ordinary Dhad jobs whose models are resolved to `uri`s.

Step caching: a stage's key is the sha256 of its resolved child spec (defaults applied, fromJob
replaced by the input models' URIs, fields that do not change the output left out), its kind, the
trainer image and the API version. Input models are identified by URI (Dhad outputs are keyed by the
producing job's UID, so a URI never names two different models), data by the URIs in the spec. The
operator holds no S3 credentials, so it cannot hash content; the trainer records content hashes in the
lineage instead (see docs/pipeline.md).
"""

from __future__ import annotations

import copy
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints, ValidationError, create_model
from pydantic.fields import FieldInfo

from dhad_api.base import DhadModel, Rule, RuledModel
from dhad_api.common import DNS_LABEL, JobKind, ModelSpec, Resources
from dhad_api.jobs import (
    API_VERSION,
    KINDS,
    OUTPUT_STAGE,
    EvalJobSpec,
    JobSpec,
    PretrainJobSpec,
    RLAIFJobSpec,
    SFTJobSpec,
    parse_spec,
)
from dhad_api.naming import MAX_NAME_LENGTH
from dhad_api.scores import produced_cel, produced_scores
from dhad_api.stages import Evaluation
from dhad_api.status import Condition, Message, State, Timestamp

KIND = "Pipeline"
PLURAL = "pipelines"
SHORT_NAMES = ("dpl",)
KEY_VERSION = 1  # bump when the cache key's recipe changes: every key changes with it

# ----------------------------------------------------------------------------------------- names
# Child jobs are <pipeline>-<stage>[-gate|-base]-<6 hex>: readable in `kubectl get dhad`, unique per
# cache key and retry, and within the job name limit (pod hostnames must fit 63 characters).
STAGE_NAME_MAX = 16
DIGEST = 6
ROLES = {"stage": "", "gate": "gate", "base": "base"}
PIPELINE_NAME_MAX = MAX_NAME_LENGTH - (1 + STAGE_NAME_MAX + 1 + max(map(len, ROLES.values())) + 1 + DIGEST)
StageName = Annotated[str, StringConstraints(pattern=DNS_LABEL, min_length=1, max_length=STAGE_NAME_MAX)]
ScoreKey = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9:._+/-]*$", max_length=64)]

LABEL_PIPELINE = "dhad.dev/pipeline"
LABEL_PIPELINE_STAGE = "dhad.dev/pipeline-stage"
LABEL_PIPELINE_ROLE = "dhad.dev/pipeline-role"
ANNOTATION_CACHE_KEY = "dhad.dev/cache-key"
ANNOTATION_RETRY = "dhad.dev/retry"  # kubectl annotate pipeline/x dhad.dev/retry=<stage>
LABEL_CACHE = "dhad.dev/cache"
# What the trainer reads to write the lineage (set on each child's env by the pipeline).
PIPELINE_ENV = "DHAD_PIPELINE"
PIPELINE_STAGE_ENV = "DHAD_PIPELINE_STAGE"
CACHE_KEY_ENV = "DHAD_CACHE_KEY"
LINEAGE_ENV = (PIPELINE_ENV, PIPELINE_STAGE_ENV, CACHE_KEY_ENV)


def child_name(pipeline: str, stage: str, role: str, key: str, retries: int = 0) -> str:
    digest = hashlib.sha256(f"{key}:{retries}".encode()).hexdigest()[:DIGEST]
    return "-".join(p for p in (pipeline, stage, ROLES[role], digest) if p)


def cache_config_map_name(key: str) -> str:
    return f"dhad-cache-{key}"


# ----------------------------------------------------------------------------- stage templates
SHARED = tuple(name for name in JobSpec.model_fields if name not in ("model", "suspend"))
SHARED_ALIASES = tuple(JobSpec.model_fields[n].alias or n for n in SHARED)
KIND_FIELDS = {JobKind.PRETRAIN: "pretrain", JobKind.SFT: "sft", JobKind.RLAIF: "rlaif", JobKind.EVAL: "eval"}


def _optional(info: FieldInfo, description: str) -> tuple[Any, FieldInfo]:
    """The field with its constraints kept, optional and without a default (so the apiserver fills nothing in)."""
    annotation = info.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if info.metadata:
        annotation = Annotated[(annotation, *info.metadata)]
    return annotation | None, Field(None, alias=info.alias, description=description.replace(" Required.", ""))


def _mentions_shared(rule: Rule) -> bool:
    return any(f"self.{alias}" in rule.cel for alias in SHARED_ALIASES)


ENV_UNIQUE = Rule("!has(self.env) || self.env.all(x, self.env.exists_one(y, y.name == x.name))", "env: names must be unique",
                  lambda s: s.env is None or len({e.name for e in s.env}) == len(s.env), ".env")


SUSPEND_IN_PIPELINE = Rule("!self.suspend", "suspend: a stage cannot be suspended on its own; set the Pipeline's spec.suspend",
                           lambda s: not s.suspend, ".suspend")


def _template(spec: type[JobSpec]) -> type[RuledModel]:
    """The kind's spec with every shared field optional: empty means spec.defaults' value."""
    fields = {name: _optional(spec.model_fields[name], f"{spec.model_fields[name].description} "
                              f"In a stage: empty means spec.defaults.{spec.model_fields[name].alias or name}.")
              for name in SHARED}
    kind = next(i.kind.value for i in KINDS.values() if i.spec is spec)
    model = create_model(f"{spec.__name__.removesuffix('JobSpec')}StageTemplate", __base__=spec,
                         __doc__=f"A {kind} of the pipeline: its spec, with shared fields from spec.defaults.", **fields)
    # Rules on shared fields can only be checked once the defaults are applied (the operator does, see walk()).
    model.rules = tuple(r for r in spec.rules if not _mentions_shared(r)) + (ENV_UNIQUE, SUSPEND_IN_PIPELINE)
    return model


TEMPLATES: dict[JobKind, type[RuledModel]] = {info.kind: _template(info.spec) for info in KINDS.values()}
PretrainStageTemplate = TEMPLATES[JobKind.PRETRAIN]
SFTStageTemplate = TEMPLATES[JobKind.SFT]
RLAIFStageTemplate = TEMPLATES[JobKind.RLAIF]
EvalStageTemplate = TEMPLATES[JobKind.EVAL]

PipelineDefaults = create_model(
    "PipelineDefaults", __base__=RuledModel,
    __doc__="The shared parts of every stage's job, written once; a stage that sets a field replaces it as a whole.",
    **{name: _optional(JobSpec.model_fields[name], f"{JobSpec.model_fields[name].description} "
                       f"Here: every stage's {JobSpec.model_fields[name].alias or name} unless the stage sets its own.")
       for name in SHARED},
)
PipelineDefaults.rules = (ENV_UNIQUE,)


# ---------------------------------------------------------------------------------------- gates
class ScoreCondition(RuledModel):
    """One condition on a gate's scores; every condition of a gate must hold."""

    score: ScoreKey = Field(
        description="score is the status.scores key the gate's evaluation produces, <suite>/<method> (for example "
        "acva/generate, arabic-mmlu/loglikelihood, vicuna-80/judge-scores). Required."
    )
    at_least: float | None = Field(None, description="atLeast is the lowest passing score (scores are fractions: 0.6 is 60%). Empty means no floor.")
    at_most: float | None = Field(None, description="atMost is the highest passing score. Empty means no ceiling.")
    max_drop: float | None = Field(
        None, ge=0, le=1000,
        description="maxDrop is how far this score may fall below the same score of the model the stage started from "
        "(its input, evaluated by the gate with the same settings), in the score's units: 0.01 is one point of accuracy. "
        "Empty means no comparison.",
    )

    rules = (
        Rule("has(self.atLeast) || has(self.atMost) || has(self.maxDrop)", "gate: a condition needs atLeast, atMost or maxDrop",
             lambda c: c.at_least is not None or c.at_most is not None or c.max_drop is not None),
    )


class Gate(RuledModel):
    """An evaluation of a stage's output model that must pass before the pipeline goes on."""

    evaluation: Evaluation = Field(description="evaluation picks the suites and scoring, as an EvalJob's. Required.")
    resources: Resources | None = Field(None, description="resources is the gate EvalJob's machines. Empty means spec.defaults.resources.")
    require: list[ScoreCondition] = Field(
        min_length=1, max_length=16, description="require are the conditions on the scores; all must hold. Required."
    )

    rules = (
        Rule("self.require.all(r, " + produced_cel("r.score", "self.evaluation") + ")",
             "gate: require[].score must be a score the gate's evaluation produces (<suite>/<method> of one of its suites)",
             lambda g: all(c.score in produced_scores(g.evaluation) for c in g.require), ".require"),
    )

    def compares(self) -> bool:
        return any(c.max_drop is not None for c in self.require)


class PipelineStage(RuledModel):
    """One stage: a named job template of one kind, an optional gate after it."""

    name: StageName = Field(description=f"name names the stage (a DNS label of at most {STAGE_NAME_MAX} characters); "
                                         "later stages reference it in fromJob.name. Required.")
    pretrain: PretrainStageTemplate | None = Field(None, description="pretrain makes this a PretrainJob stage. Exactly one of pretrain, sft, rlaif and eval.")
    sft: SFTStageTemplate | None = Field(None, description="sft makes this an SFTJob stage. Exactly one of pretrain, sft, rlaif and eval.")
    rlaif: RLAIFStageTemplate | None = Field(None, description="rlaif makes this an RLAIFJob stage. Exactly one of pretrain, sft, rlaif and eval.")
    eval: EvalStageTemplate | None = Field(None, description="eval makes this an EvalJob stage (a report, no model). Exactly one of pretrain, sft, rlaif and eval.")
    gate: Gate | None = Field(None, description="gate evaluates the stage's output model and stops the pipeline unless every condition holds. Empty means no gate.")
    cache: bool = Field(True, description="cache reuses an earlier run of this exact stage (same key) instead of running it again. Default true.")

    rules = (
        Rule("[has(self.pretrain), has(self.sft), has(self.rlaif), has(self.eval)].filter(x, x).size() == 1",
             "stage: set exactly one of pretrain, sft, rlaif and eval",
             lambda s: sum(getattr(s, f) is not None for f in KIND_FIELDS.values()) == 1),
        Rule("!has(self.gate) || !has(self.eval)", "stage: a gate needs a stage that outputs a model (an eval stage has none)",
             lambda s: s.gate is None or s.eval is None, ".gate"),
    )

    @property
    def kind(self) -> JobKind:
        return next(k for k, f in KIND_FIELDS.items() if getattr(self, f) is not None)

    def template(self) -> RuledModel:
        return getattr(self, KIND_FIELDS[self.kind])


# ---------------------------------------------------------------- model references inside a pipeline
Segment = tuple[str, str, bool]  # (python attribute, json key, is a list)


def model_paths(model: type[BaseModel], depth: int = 0) -> list[tuple[Segment, ...]]:
    """Every place a ModelSpec sits in `model`, as attribute paths (found by walking the field types)."""
    from dhad_api.crd import _unwrap

    found: list[tuple[Segment, ...]] = []
    for name, info in model.model_fields.items():
        annotation, _ = _unwrap(info.annotation)
        is_list = typing.get_origin(annotation) is list
        if is_list:
            (annotation,) = typing.get_args(annotation)
            annotation, _ = _unwrap(annotation)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            continue
        segment = (name, info.alias or name, is_list)
        if annotation is ModelSpec:
            found.append((segment,))
        elif depth < 6:
            found += [(segment, *rest) for rest in model_paths(annotation, depth + 1)]
    return found


def path_text(path: tuple[Segment, ...]) -> str:
    return ".".join(f"{key}[]" if is_list else key for _, key, is_list in path)


def _cel_guarded(expr: str, path: tuple[Segment, ...], leaf, depth: int = 0) -> str:
    """CEL that applies `leaf` to the fromJob at `path` under `expr`, true where any part is absent."""
    if not path:
        return f"(!has({expr}.fromJob) || {leaf(expr + '.fromJob')})"
    (_, key, is_list), rest = path[0], path[1:]
    if is_list:
        var = f"m{depth}"
        return f"(!has({expr}.{key}) || {expr}.{key}.all({var}, {_cel_guarded(var, rest, leaf, depth + 1)}))"
    return f"(!has({expr}.{key}) || {_cel_guarded(f'{expr}.{key}', rest, leaf, depth + 1)})"


def _references(obj: BaseModel | None, path: tuple[Segment, ...]) -> list:
    """The JobReference objects (fromJob) at `path` in a typed object."""
    if obj is None:
        return []
    (attr, _, is_list), rest = path[0], path[1:]
    value = getattr(obj, attr, None)
    items = (value or []) if is_list else ([value] if value is not None else [])
    if not rest:
        return [m.from_job for m in items if m.from_job is not None]
    return [ref for item in items for ref in _references(item, rest)]


@dataclass(frozen=True)
class RefSite:
    """A place where a stage's job (or its gate) names a model: `where` is how messages name it."""

    field: str  # pretrain | sft | rlaif | eval | gate
    path: tuple[Segment, ...]
    may_be_same: bool  # a gate's judge may be its own stage's model

    @property
    def where(self) -> str:
        return f"spec.stages[].{self.field}.{path_text(self.path)}.fromJob.name"


def _sites() -> list[RefSite]:
    sites = [RefSite(KIND_FIELDS[kind], path, False) for kind, template in TEMPLATES.items() for path in model_paths(template)]
    sites += [RefSite("gate", (("evaluation", "evaluation", False), *path), True) for path in model_paths(Evaluation)]
    return sites


SITES = _sites()
_KIND_HAS = " : ".join(f"{{ref}}.kind == '{kind.value}' ? has(t.{f})" for kind, f in KIND_FIELDS.items() if kind != JobKind.EVAL) + " : has(t.eval)"


def _site_rules(site: RefSite) -> tuple[Rule, ...]:
    """Three rules per site (unknown stage, not earlier, wrong kind), in CEL and in Python, naming the field.
    Positions come from two-variable comprehensions (`all(i, s, ...)`, Kubernetes 1.32+): list.indexOf
    over a mapped list costs the apiserver's estimate 100 times its budget."""
    order = "<=" if site.may_be_same else "<"

    def cel(check: str) -> str:
        return f"self.stages.all(i, s, !has(s.{site.field}) || {_cel_guarded('s.' + site.field, site.path, check)})"

    def known(ref):
        return f"self.stages.exists(t, t.name == {ref}.name)"

    def earlier(ref):
        return f"(!{known(ref)} || self.stages.exists(j, t, j {order} i && t.name == {ref}.name))"

    def kind(ref):
        return f"(!{known(ref)} || self.stages.exists(t, t.name == {ref}.name && ({_KIND_HAS.format(ref=ref)})))"

    def refs(spec):
        return [(i, ref) for i, stage in enumerate(spec.stages) for ref in _references(getattr(stage, site.field), site.path)]

    def index(spec, name):
        return next((i for i, s in enumerate(spec.stages) if s.name == name), None)

    def py_earlier(spec):
        return all(index(spec, r.name) is None or (index(spec, r.name) <= i if site.may_be_same else index(spec, r.name) < i)
                   for i, r in refs(spec))

    def py_kind(spec):
        return all(index(spec, r.name) is None or spec.stages[index(spec, r.name)].kind == r.kind for _, r in refs(spec))

    return (
        Rule(cel(known), f"{site.where}: names no stage of this pipeline (inside a Pipeline, fromJob names a stage)",
             lambda spec: all(index(spec, r.name) is not None for _, r in refs(spec)), ".stages"),
        Rule(cel(earlier), f"{site.where}: must name an earlier stage (stages run in order, so a later stage or a cycle is not allowed)",
             py_earlier, ".stages"),
        Rule(cel(kind), f"{site.where}: fromJob.kind must be the kind of the stage it names", py_kind, ".stages"),
    )


class PipelineSpec(RuledModel):
    """The AceGPT recipe as one object: stages in order, each a job of one kind, gates between them."""

    defaults: PipelineDefaults = Field(default_factory=PipelineDefaults, description="defaults are the shared parts of every stage's job (storage, image, resources, podTemplate, ...). Default none.")
    stages: list[PipelineStage] = Field(min_length=1, max_length=16, description="stages run in this order; a stage starts when the one before it (and its gate) succeeded. Required.")
    suspend: bool = Field(False, description="suspend suspends the running stage's job (its pods stop, checkpoints stay) and starts no new stage; false again resumes. Default false.")

    rules = (
        Rule("self.stages.all(x, self.stages.exists_one(y, y.name == x.name))", "stages: names must be unique",
             lambda p: len({s.name for s in p.stages}) == len(p.stages), ".stages"),
        Rule("has(self.defaults.storage) || self.stages.all(s, "
             + " && ".join(f"(!has(s.{f}) || has(s.{f}.storage))" for f in KIND_FIELDS.values()) + ")",
             "defaults.storage: set storage here or in every stage",
             lambda p: p.defaults.storage is not None or all(s.template().storage is not None for s in p.stages), ".defaults.storage"),
    ) + tuple(rule for site in SITES for rule in _site_rules(site))


# ------------------------------------------------------------------------------------------ status
Uri = Annotated[str, StringConstraints(max_length=1024)]
Scores = dict[Annotated[str, StringConstraints(max_length=64)], float]


class GateStatus(DhadModel):
    """A gate's evaluation, its baseline and the verdict."""

    state: State = Field(State.PENDING, description="state is Pending, Running, Succeeded (passed) or Failed (a condition failed, or its EvalJob did).")
    job: Annotated[str, StringConstraints(max_length=63)] | None = Field(None, description="job is the EvalJob of the stage's output model.")
    baseline_job: Annotated[str, StringConstraints(max_length=63)] | None = Field(None, description="baselineJob is the EvalJob of the stage's input model (for maxDrop).")
    cached: bool = Field(False, description="cached is true when the scores came from the step cache.")
    scores: Scores = Field(default_factory=dict, max_length=32, description="scores are the output model's scores.")
    baseline_scores: Scores = Field(default_factory=dict, max_length=32, description="baselineScores are the input model's scores.")
    message: Message | None = Field(None, description="message is the verdict: each condition with its score and threshold.")


class PipelineStageStatus(DhadModel):
    """One stage as the pipeline sees it."""

    name: Annotated[str, StringConstraints(max_length=STAGE_NAME_MAX)] = Field(description="name is the stage.")
    kind: JobKind = Field(description="kind is the stage's job kind.")
    state: State = Field(State.PENDING, description="state is the stage's state (a cached stage is Succeeded at once).")
    job: Annotated[str, StringConstraints(max_length=63)] | None = Field(None, description="job is the stage's job (for a cached stage, the job that produced the output).")
    cached: bool = Field(False, description="cached is true when the output came from the step cache instead of a new run.")
    cached_from: Annotated[str, StringConstraints(max_length=256)] | None = Field(None, description="cachedFrom is the pipeline/stage whose run produced a cached output.")
    cache_key: Annotated[str, StringConstraints(max_length=64)] | None = Field(None, description="cacheKey is the stage's key: sha256 of its resolved spec, input models, trainer image and API version.")
    output_model: Uri | None = Field(None, description="outputModel is the model the stage produced.")
    scores: Scores = Field(default_factory=dict, max_length=32, description="scores are an eval stage's scores.")
    report: Uri | None = Field(None, description="report is an eval stage's report (summary.md).")
    start_time: Timestamp | None = Field(None, description="startTime is when the stage's job started.")
    completion_time: Timestamp | None = Field(None, description="completionTime is when it finished.")
    duration_seconds: int | None = Field(None, ge=0, description="durationSeconds is completionTime - startTime (of the original run, when cached).")
    retries: int = Field(0, ge=0, description="retries counts dhad.dev/retry requests acted on for this stage's current key.")
    resume_from: Uri | None = Field(None, description="resumeFrom is the checkpoint the latest retry resumed from.")
    message: Message | None = Field(None, description="message explains the state.")
    gate: GateStatus | None = Field(None, description="gate is the stage's gate, when it has one.")


class RetryRecord(DhadModel):
    """A dhad.dev/retry request acted on: the child it replaced is named by the stage, role, key and count."""

    stage: Annotated[str, StringConstraints(max_length=STAGE_NAME_MAX)] = Field(description="stage is the stage retried.")
    role: Annotated[str, StringConstraints(pattern=r"^(stage|gate|base)$")] = Field(description="role is stage (its job), gate or base (the gate's baseline EvalJob).")
    key: Annotated[str, StringConstraints(max_length=64)] = Field(description="key is the cache key the retries count for; a changed spec starts again at 0.")
    retries: int = Field(0, ge=0, description="retries is how often it was retried.")
    resume_from: Uri | None = Field(None, description="resumeFrom is the checkpoint the newest retry resumes from.")


class PipelineStatus(DhadModel):
    """Status written by the operator: the pipeline's state and every stage's."""

    state: State = Field(State.PENDING, description="state is the one-word summary of the conditions.")
    conditions: list[Condition] = Field(default_factory=list, max_length=16, description="conditions are the detailed state with reasons.")
    observed_generation: int | None = Field(None, ge=0, description="observedGeneration is the spec generation last reconciled.")
    stage: Annotated[str, StringConstraints(max_length=STAGE_NAME_MAX + 5)] | None = Field(None, description="stage is the stage running now (<stage>/gate while its gate runs).")
    progress: Annotated[str, StringConstraints(max_length=16)] | None = Field(None, description="progress is succeeded stages / all stages, for kubectl.")
    stages: list[PipelineStageStatus] = Field(default_factory=list, max_length=16, description="stages are every stage's state, in order.")
    output_model: Uri | None = Field(None, description="outputModel is the promoted model: the last model stage's output, set only when every stage and gate succeeded.")
    start_time: Timestamp | None = Field(None, description="startTime is when the first stage started.")
    completion_time: Timestamp | None = Field(None, description="completionTime is when the pipeline Succeeded or Failed.")
    retries: list[RetryRecord] = Field(default_factory=list, max_length=48, description="retries are the retry requests acted on (they name the replacement jobs).")


# ------------------------------------------------------------------------------------ child specs
NON_SEMANTIC = ("suspend", "restartPolicy", "queueName", "ttlSecondsAfterFinished", "activeDeadlineSeconds",
                "podTemplate", "plan", "checkpoint", "hfTokenSecretRef")  # how a job runs, not what it makes


def _resolve_refs(node: Any, outputs: dict[str, str | None]) -> None:
    """Replaces every `fromJob` naming a stage with that stage's output `uri`, in place (JSON dicts)."""
    if isinstance(node, dict):
        ref = node.get("fromJob")
        if isinstance(ref, dict) and ref.get("name") in outputs:
            node.pop("fromJob")
            node["uri"] = outputs[ref["name"]]
        for value in node.values():
            _resolve_refs(value, outputs)
    elif isinstance(node, list):
        for item in node:
            _resolve_refs(item, outputs)


def _resolved(body: dict, outputs: dict[str, str | None] | None) -> dict:
    body = copy.deepcopy(body)
    if outputs is not None:
        _resolve_refs(body, outputs)
    return body


def merged_spec(spec: PipelineSpec, stage: PipelineStage, outputs: dict[str, str | None] | None = None) -> dict:
    """The stage's job spec: defaults, then the stage's own fields, fromJob resolved from `outputs` (left as
    fromJob where `outputs` is None, for `dhad plan`). Not yet validated."""
    return _resolved({**spec.defaults.to_json_dict(), **stage.template().to_json_dict()}, outputs)


def gate_spec(spec: PipelineSpec, stage: PipelineStage, model: dict, outputs: dict[str, str | None] | None = None) -> dict:
    """The gate's EvalJob spec for `model` (the stage's output, or its input for the baseline): the stage's
    shared fields, then the gate's resources."""
    gate = stage.gate
    shared = {k: v for k, v in stage.template().to_json_dict().items() if k in SHARED_ALIASES}
    body = {**spec.defaults.to_json_dict(), **shared, "model": model, "evaluation": gate.evaluation.to_json_dict()}
    if gate.resources is not None:
        body["resources"] = gate.resources.to_json_dict()
    return _resolved(body, outputs)


def cache_key(kind: JobKind | str, spec: dict, trainer: str) -> str:
    """sha256 of what decides a stage's output: kind, the validated spec without how-it-runs fields, the
    trainer (image), the API version and this recipe's version."""
    typed = parse_spec(kind, spec).to_json_dict()
    semantic = {k: v for k, v in typed.items() if k not in NON_SEMANTIC}
    semantic["storage"] = {k: typed["storage"].get(k) for k in ("endpoint", "bucket")}
    semantic["env"] = [e for e in typed.get("env", []) if e["name"] not in LINEAGE_ENV]
    document = {"v": KEY_VERSION, "api": API_VERSION, "kind": str(JobKind(kind).value), "trainer": trainer, "spec": semantic}
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


def with_lineage_env(spec: dict, pipeline: str, stage: str, key: str) -> dict:
    """The child spec plus what its trainer writes in the lineage (a user value of these names is replaced)."""
    spec = copy.deepcopy(spec)
    env = [e for e in spec.get("env", []) if e.get("name") not in LINEAGE_ENV]
    spec["env"] = env + [{"name": PIPELINE_ENV, "value": pipeline}, {"name": PIPELINE_STAGE_ENV, "value": stage},
                         {"name": CACHE_KEY_ENV, "value": key}]
    return spec


def _errors(error: ValidationError, where: str) -> str:
    parts = []
    for e in error.errors():
        loc = ".".join(str(p) for p in e["loc"])
        parts.append(f"{where}.{loc}: {e['msg']}" if loc else f"{where}: {e['msg']}")
    return "; ".join(parts)[:2000]


PLACEHOLDER = "s3://dhad-pipeline/placeholder"


def validate(spec: PipelineSpec) -> str | None:
    """What CEL cannot check before anything runs: every stage's (and gate's) job spec with the defaults
    applied. Returns a message naming the field, or None."""
    outputs = {s.name: PLACEHOLDER for s in spec.stages}
    for i, stage in enumerate(spec.stages):
        where = f"spec.stages[{i}].{KIND_FIELDS[stage.kind]}"
        try:
            parse_spec(stage.kind, merged_spec(spec, stage, outputs))
        except ValidationError as error:
            return _errors(error, where)
        if stage.gate is not None:
            try:
                parse_spec(JobKind.EVAL, gate_spec(spec, stage, {"uri": PLACEHOLDER}, outputs))
            except ValidationError as error:
                return _errors(error, f"spec.stages[{i}].gate")
    return None


# --------------------------------------------------------------------------------------- the walk
@dataclass(frozen=True)
class ChildReport:
    """What the pipeline reads from one child job: its status (as the operator wrote it) and suspend."""

    state: str = State.PENDING.value
    output_model: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    last_checkpoint: str | None = None
    report: str | None = None
    reason: str | None = None
    message: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    suspended: bool = False

    @classmethod
    def of(cls, obj: dict) -> ChildReport:
        status = obj.get("status") or {}
        failed = next((c for c in status.get("conditions") or [] if c.get("type") == "Failed" and c.get("status") == "True"), {})
        return cls(state=status.get("state") or State.PENDING.value, output_model=status.get("outputModel"),
                   scores=dict(status.get("scores") or {}), last_checkpoint=status.get("lastCheckpoint"), report=status.get("report"),
                   reason=failed.get("reason"), message=failed.get("message"), start_time=status.get("startTime"),
                   completion_time=status.get("completionTime"), suspended=bool((obj.get("spec") or {}).get("suspend")))


@dataclass(frozen=True)
class CacheEntry:
    """A finished step anyone in the namespace may reuse: what it produced and who produced it."""

    key: str
    kind: str
    job: str
    pipeline: str
    stage: str
    output_model: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    duration_seconds: int | None = None
    completion_time: str | None = None
    report: str | None = None

    def to_dict(self) -> dict:
        return {"key": self.key, "kind": self.kind, "job": self.job, "pipeline": self.pipeline, "stage": self.stage,
                "outputModel": self.output_model, "scores": self.scores, "durationSeconds": self.duration_seconds,
                "completionTime": self.completion_time, "report": self.report}

    @classmethod
    def from_dict(cls, d: dict) -> CacheEntry | None:
        try:
            return cls(key=str(d["key"]), kind=str(d["kind"]), job=str(d["job"]), pipeline=str(d["pipeline"]), stage=str(d["stage"]),
                       output_model=d.get("outputModel"), scores={str(k): float(v) for k, v in (d.get("scores") or {}).items()},
                       duration_seconds=d.get("durationSeconds"), completion_time=d.get("completionTime"), report=d.get("report"))
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class Step:
    """One child job the pipeline wants to exist now (created when missing)."""

    stage: str
    role: str  # stage | gate | base
    kind: JobKind
    name: str
    key: str
    spec: dict  # the child's spec, lineage env included (suspend is the caller's)


@dataclass
class Walk:
    """Where the pipeline stands: the children it wants, every stage's status, the outcome."""

    steps: list[Step] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)
    current: str | None = None
    outcome: State = State.RUNNING  # RUNNING (a child is pending or running), SUCCEEDED or FAILED
    reason: str = ""
    message: str = ""
    output_model: str | None = None
    cache_writes: list[CacheEntry] = field(default_factory=list)
    retried: str | None = None  # the stage a retry request was acted on
    retries: list[dict] = field(default_factory=list)  # what status.retries keeps for the next walk


def _seconds(start: str | None, end: str | None) -> int | None:
    try:
        return max(0, int((datetime.fromisoformat(end.replace("Z", "+00:00")) - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()))
    except (AttributeError, ValueError):
        return None


def check_gate(gate: Gate, scores: dict[str, float], baseline: dict[str, float]) -> tuple[bool, str]:
    """(passed, message): every condition with its score and threshold, failures first."""
    failed, passed = [], []
    for c in gate.require:
        value = scores.get(c.score)
        if value is None:
            failed.append(f"{c.score} missing from the evaluation's scores (produced: {', '.join(sorted(scores)) or 'none'})")
            continue
        checks = []
        if c.at_least is not None:
            checks.append((value >= c.at_least, f"{c.score} = {value:.4f} {'>=' if value >= c.at_least else '<'} atLeast {c.at_least}"))
        if c.at_most is not None:
            checks.append((value <= c.at_most, f"{c.score} = {value:.4f} {'<=' if value <= c.at_most else '>'} atMost {c.at_most}"))
        if c.max_drop is not None:
            base = baseline.get(c.score)
            if base is None:
                checks.append((False, f"{c.score}: the input model has no such score to compare with"))
            else:
                drop = base - value
                ok = drop <= c.max_drop + 1e-12
                checks.append((ok, f"{c.score} = {value:.4f}, {drop:+.4f} below the input model's {base:.4f} "
                                   f"({'within' if ok else 'more than'} maxDrop {c.max_drop})"))
        for ok, text in checks:
            (passed if ok else failed).append(text)
    return not failed, "; ".join(failed + passed)[:4000]


class _Walker:
    """One pass over the stages; see walk()."""

    def __init__(self, pipeline: str, spec: PipelineSpec, children: dict, cache: dict, trainer: str, memory: dict, retry: str | None):
        self.pipeline, self.spec, self.children, self.cache = pipeline, spec, children, cache
        self.trainer, self.memory, self.retry = trainer, memory, retry
        self.walk = Walk()
        self.outputs: dict[str, str | None] = {}

    def child(self, stage: PipelineStage, role: str, kind: JobKind, body: dict, entry: dict):
        """(key, child name, report of the existing child or None, cache hit or None); records the step."""
        key = cache_key(kind, body, self.trainer)
        record = self.memory.get((stage.name, role))
        if record is None or record.get("key") != key:
            record = {"key": key, "retries": 0}
        name = child_name(self.pipeline, stage.name, role, key, record["retries"])
        report = self.children.get(name)
        if (report is not None and report.state == State.FAILED.value and self.retry == stage.name
                and self.walk.retried is None):
            record = {"key": key, "retries": record["retries"] + 1,
                      "resumeFrom": report.last_checkpoint or record.get("resumeFrom")}
            self.walk.retried = stage.name
            name, report = child_name(self.pipeline, stage.name, role, key, record["retries"]), None
        self.memory[(stage.name, role)] = record
        resume = record.get("resumeFrom")
        if role == "stage" and record["retries"]:
            entry.update(retries=record["retries"], resumeFrom=resume)
        hit = self.cache.get(key) if stage.cache and report is None else None
        if report is None and hit is None:
            body = copy.deepcopy(body)
            if resume:
                body.setdefault("checkpoint", {})["resumeFrom"] = resume
            self.walk.steps.append(Step(stage.name, role, kind, name, key, with_lineage_env(body, self.pipeline, stage.name, key)))
        elif report is not None:
            self.walk.steps.append(Step(stage.name, role, kind, name, key, {}))
            if report.state == State.SUCCEEDED.value and key not in self.cache:
                self.walk.cache_writes.append(CacheEntry(key, kind.value, name, self.pipeline, stage.name, report.output_model,
                                                         report.scores, _seconds(report.start_time, report.completion_time),
                                                         report.completion_time, report.report))
        return key, name, report, hit

    def fail(self, reason: str, message: str) -> Walk:
        self.walk.outcome, self.walk.reason, self.walk.message = State.FAILED, reason, message
        return self.walk

    def run(self) -> Walk:
        for stage in self.spec.stages:
            entry = {"name": stage.name, "kind": stage.kind.value, "state": State.PENDING.value}
            self.walk.stages.append(entry)
            body = merged_spec(self.spec, stage, self.outputs)
            key, name, report, hit = self.child(stage, "stage", stage.kind, body, entry)
            entry.update(cacheKey=key, job=name)
            if hit is not None:
                entry.update(state=State.SUCCEEDED.value, cached=True, job=hit.job, cachedFrom=f"{hit.pipeline}/{hit.stage}",
                             outputModel=hit.output_model, scores=hit.scores, durationSeconds=hit.duration_seconds,
                             completionTime=hit.completion_time, report=hit.report)
                output = hit.output_model
            elif report is None or report.state not in (State.SUCCEEDED.value, State.FAILED.value):
                entry.update(state=(report.state if report else State.PENDING.value), startTime=report.start_time if report else None)
                self.walk.current = stage.name
                return self.walk
            else:
                entry.update(state=report.state, outputModel=report.output_model, scores=report.scores, report=report.report, startTime=report.start_time,
                             completionTime=report.completion_time, durationSeconds=_seconds(report.start_time, report.completion_time))
                if report.state == State.FAILED.value:
                    entry["message"] = f"{report.reason or 'Failed'}: {report.message or ''}".strip()
                    self.walk.current = stage.name
                    return self.fail("StageFailed", f"stage {stage.name} ({stage.kind.value} {name}) failed: {entry['message']}; "
                                     f"fix the cause and `kubectl annotate pipeline {self.pipeline} {ANNOTATION_RETRY}={stage.name}` "
                                     "to retry it from its newest checkpoint")
                output = report.output_model
            if stage.kind != JobKind.EVAL and not output:
                self.walk.current = stage.name
                return self.fail("NoOutputModel", f"stage {stage.name} succeeded without an output model")
            self.outputs[stage.name] = output
            if stage.gate is not None and not self.gate(stage, body, output, entry):
                return self.walk
        self.walk.outcome = State.SUCCEEDED
        last = next((s for s in reversed(self.spec.stages) if s.kind != JobKind.EVAL), None)
        self.walk.output_model = self.outputs.get(last.name) if last else None
        return self.walk

    def gate(self, stage: PipelineStage, body: dict, output: str, entry: dict) -> bool:
        """True when the gate passed; otherwise the walk stops here (running, or Failed)."""
        status: dict = {"state": State.PENDING.value}
        entry["gate"] = status
        runs = [("gate", gate_spec(self.spec, stage, {"uri": output}, self.outputs), "job", "scores")]
        if stage.gate.compares():
            runs.append(("base", gate_spec(self.spec, stage, body["model"], self.outputs), "baselineJob", "baselineScores"))
        done, cached = {}, []
        for role, spec, job_field, scores_field in runs:
            _, name, report, hit = self.child(stage, role, JobKind.EVAL, spec, entry)
            status[job_field] = hit.job if hit else name
            if hit is not None:
                done[role] = hit.scores
                cached.append(role)
            elif report is not None and report.state == State.SUCCEEDED.value:
                done[role] = report.scores
            elif report is not None and report.state == State.FAILED.value:
                status.update(state=State.FAILED.value, message=f"{report.reason or 'Failed'}: {report.message or ''}")
                self.walk.current = f"{stage.name}/gate"
                self.fail("GateFailed", f"gate of stage {stage.name}: EvalJob {name} failed: {status['message']}; "
                          f"`kubectl annotate pipeline {self.pipeline} {ANNOTATION_RETRY}={stage.name}` runs it again")
                return False
            else:
                status["state"] = State.RUNNING.value if report is not None else State.PENDING.value
            if role in done:
                status[scores_field] = done[role]
        status["cached"] = len(cached) == len(runs)
        if len(done) < len(runs):
            self.walk.current = f"{stage.name}/gate"
            return False
        passed, message = check_gate(stage.gate, done["gate"], done.get("base", {}))
        status.update(state=(State.SUCCEEDED if passed else State.FAILED).value, message=message)
        if not passed:
            self.walk.current = f"{stage.name}/gate"
            self.fail("GateFailed", f"gate of stage {stage.name} failed: {message}; nothing is promoted")
        return passed


def walk(pipeline: str, spec: PipelineSpec, children: dict[str, ChildReport], cache: dict[str, CacheEntry],
         trainer: str, retries: list[dict] | None = None, retry: str | None = None, image: str | None = None) -> Walk:
    """Where the pipeline stands, from its spec, its children's reports (by child name) and the step cache.

    `trainer` identifies the trainer in cache keys; `image` is set on children that leave it empty (the
    operator's default image, so the key and the child agree). `retries` are the retry records earlier walks
    returned (the operator keeps them in status.retries); `retry` is the stage a dhad.dev/retry request
    names: its failed child is replaced by a new one (a new name) that resumes from its newest checkpoint.
    """
    memory = {(r["stage"], r["role"]): {k: r[k] for k in ("key", "retries", "resumeFrom") if k in r} for r in retries or []}
    if image and not spec.defaults.image:
        spec = spec.model_copy(update={"defaults": spec.defaults.model_copy(update={"image": image})})
    walker = _Walker(pipeline, spec, children, cache, trainer, memory, retry)
    problem = validate(spec)
    if problem:
        result = walker.fail("InvalidSpec", problem)
    else:
        try:
            result = walker.run()
        except ValidationError as error:  # an output URI the next stage's spec refuses
            result = walker.fail("InvalidSpec", _errors(error, f"spec.stages[{len(walker.walk.stages) - 1}]"))
    result.retries = [{"stage": stage, "role": role, **record} for (stage, role), record in memory.items() if record.get("retries")]
    for entry in result.stages:
        for k in [k for k, v in entry.items() if v is None]:
            del entry[k]
        if not entry.get("scores"):
            entry.pop("scores", None)
        if entry.get("gate"):
            entry["gate"] = {k: v for k, v in entry["gate"].items() if v is not None}
    return result


def parse_pipeline(spec: dict) -> PipelineSpec:
    return PipelineSpec.model_validate(spec)


def model_output(kind: JobKind) -> bool:
    return kind != JobKind.EVAL and KINDS[kind].stages[-1] in OUTPUT_STAGE


__all__ = ["PipelineSpec", "PipelineStage", "Gate", "ScoreCondition", "PipelineStatus", "walk", "parse_pipeline", "cache_key", "merged_spec",
           "gate_spec", "check_gate", "validate", "child_name", "ChildReport", "CacheEntry", "Step", "Walk",
           "PretrainJobSpec", "SFTJobSpec", "RLAIFJobSpec", "EvalJobSpec"]


# ------------------------------------------------------------------------------------------- CRD
PRINTER_COLUMNS = [
    {"name": "State", "type": "string", "jsonPath": ".status.state"},
    {"name": "Stage", "type": "string", "jsonPath": ".status.stage", "description": "the stage running now"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress", "description": "succeeded stages / stages"},
    {"name": "Output", "type": "string", "jsonPath": ".status.outputModel", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def pipeline_crd() -> dict:
    """The Pipeline CRD, generated like the job kinds' (crd.model_schema); its spec may change after creation."""
    from dhad_api.crd import model_schema
    from dhad_api.jobs import GROUP, VERSION
    from dhad_api.naming import NAME_PATTERN

    root = {
        "type": "object", "required": ["spec"],
        "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
                       "spec": model_schema(PipelineSpec), "status": model_schema(PipelineStatus)},
        "x-kubernetes-validations": [{
            "rule": f"size(self.metadata.name) <= {PIPELINE_NAME_MAX} && self.metadata.name.matches('{NAME_PATTERN}')",
            "message": f"metadata.name must be at most {PIPELINE_NAME_MAX} characters, start with a letter and hold only "
            "lowercase letters, digits and '-': stage jobs are named <pipeline>-<stage>[-gate]-<digest>",
        }],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP, "scope": "Namespaced",
            "names": {"kind": KIND, "plural": PLURAL, "singular": KIND.lower(), "listKind": f"{KIND}List",
                      "shortNames": list(SHORT_NAMES), "categories": ["dhad"]},
            "versions": [{"name": VERSION, "served": True, "storage": True, "schema": {"openAPIV3Schema": root},
                          "subresources": {"status": {}}, "additionalPrinterColumns": PRINTER_COLUMNS}],
        },
    }


# ------------------------------------------------------------------------------------------ plans
@dataclass(frozen=True)
class PlannedStep:
    """One stage's (or gate's) job and its memory plan, as `dhad plan` prints it and the operator checks it."""

    label: str  # "<stage>" or "<stage>/gate"
    kind: JobKind
    spec: JobSpec
    verdict: Any  # dhad_api.plan.PlanVerdict


def plan_pipeline(spec: PipelineSpec, nodes: list[dict[str, str]] = (), mfu: float | None = None) -> list[PlannedStep]:
    """Every stage's and gate's plan; fromJob between stages is followed to the first stage's model, so a
    stage after a vocabulary expansion is planned with the grown vocabulary."""
    from dhad_api.plan import DEFAULT_MFU, planned_condition

    merged = {s.name: (s.kind, merged_spec(spec, s)) for s in spec.stages}

    def lookup(kind: str, name: str) -> dict | None:
        found = merged.get(name)
        return found[1] if found and found[0].value == kind else None

    steps = []
    for stage in spec.stages:
        kind, body = merged[stage.name]
        typed = parse_spec(kind, body)
        steps.append(PlannedStep(stage.name, kind, typed, planned_condition(kind, typed, nodes, lookup, mfu or DEFAULT_MFU)))
        if stage.gate is not None:
            model = {**body["model"]}
            model.pop("uri", None)
            model["fromJob"] = {"kind": kind.value, "name": stage.name}
            gate = parse_spec(JobKind.EVAL, gate_spec(spec, stage, model))
            steps.append(PlannedStep(f"{stage.name}/gate", JobKind.EVAL, gate,
                                     planned_condition(JobKind.EVAL, gate, nodes, lookup, mfu or DEFAULT_MFU)))
    return steps
