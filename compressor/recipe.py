"""The recipe: a YAML file validated completely at load time (pydantic v2, extra="forbid" everywhere).

A typo, a wrong type, a bad enum value or an out-of-range number is a RecipeError naming the dotted field,
the bad value and what is allowed. `--set a.b=c` overrides are parsed as YAML scalars before validation.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import RecipeError
from .registry import did_you_mean

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

PosInt = Field(gt=0)
Fraction = Field(gt=0.0, lt=1.0)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


# ---------------------------------------------------------------------------------------------- model, data
class ModelConfig(Strict):
    arch: Optional[str] = Field(None, description="torchvision:NAME | timm:NAME | zoo:NAME | python:pkg.mod:factory")
    num_classes: int = Field(10, gt=0)
    in_channels: int = Field(3, gt=0)
    input_shape: list[int] = Field([3, 224, 224], description="C,H,W of one sample; the batch axis is free")
    ignore: list[str] = Field(default_factory=list, description="never pruned: module names or re:patterns")

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, v: list[int]) -> list[int]:
        if len(v) != 3 or any(int(d) <= 0 for d in v):
            raise ValueError("must be three positive integers [C, H, W]")
        return v

    @field_validator("ignore")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for item in v:
            if item.startswith("re:"):
                try:
                    re.compile(item[3:])
                except re.error as exc:
                    raise ValueError(f"{item!r} is not a valid regular expression ({exc})") from None
        return v

    @model_validator(mode="after")
    def _channels_match(self) -> "ModelConfig":
        if self.input_shape[0] != self.in_channels:
            raise ValueError(
                f"input_shape[0]={self.input_shape[0]} differs from in_channels={self.in_channels}; make them equal"
            )
        return self


class SyntheticConfig(Strict):
    train_size: int = Field(512, gt=0)
    val_size: int = Field(256, gt=0)
    seed: int = 0


DataKind = Literal["fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic", "python"]


class DataConfig(Strict):
    kind: DataKind = "synthetic"
    root: Optional[Path] = Field(None, description="default search: ./data, $COMPRESSOR_DATA, /usr/share/datasets")
    download: bool = False
    factory: Optional[str] = Field(None, description="for kind: python, 'pkg.mod:build' -> (train, val) datasets")
    batch_size: int = Field(128, gt=0)
    eval_batch_size: Optional[int] = Field(None, gt=0)
    workers: int = Field(0, ge=0)
    train_subset: Optional[int] = Field(None, gt=0, description="a seeded random N training samples (fixed seed "
                                        "compressor.data.SUBSET_SEED: the same samples on every machine, DDP rank "
                                        "and resume); all of them when N >= the set's size")
    val_subset: Optional[int] = Field(None, gt=0, description="a seeded random N validation samples (fixed seed, as "
                                      "train_subset); all of them when N >= the set's size")
    augment: bool = True
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    @model_validator(mode="after")
    def _factory(self) -> "DataConfig":
        if self.kind == "python" and not self.factory:
            raise ValueError("kind: python needs data.factory: 'pkg.module:build'")
        if self.factory and not re.fullmatch(r"[\w.]+:[\w]+", self.factory):
            raise ValueError(f"factory {self.factory!r} must look like 'pkg.module:function'")
        return self


# ---------------------------------------------------------------------------------------------- pruning
ImportanceKind = Literal["magnitude", "taylor", "bn-scale", "gate", "random", "saliency"]


class ImportanceConfig(Strict):
    kind: ImportanceKind = "magnitude"
    p: int = Field(2, ge=1, le=2)


class TargetConfig(Strict):
    macs: Optional[float] = Field(None, gt=0.0, lt=1.0, description="remaining fraction of dense MACs")
    speedup: Optional[float] = Field(None, gt=1.0, description="dense MACs / pruned MACs")
    channels: Optional[float] = Field(None, gt=0.0, lt=1.0, description="fraction of prunable channels removed")

    @model_validator(mode="after")
    def _exactly_one(self) -> "TargetConfig":
        given = [k for k in ("macs", "speedup", "channels") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of macs, speedup, channels (got {', '.join(given) or 'none'})")
        return self

    def remaining_macs(self) -> Optional[float]:
        """The remaining MAC fraction asked for, or None for a channel-ratio target."""
        if self.macs is not None:
            return self.macs
        if self.speedup is not None:
            return 1.0 / self.speedup
        return None


class ScheduleConfig(Strict):
    events: int = Field(4, gt=0, description="number of host selection events")
    start_epoch: int = Field(0, ge=0)
    end_epoch: Optional[int] = Field(None, ge=0, description="default: half of finetune.epochs")
    shape: Literal["linear", "cubic"] = "linear"


class DPMConfig(Strict):
    steps: int = Field(8, ge=1, description="N: decay steps from full norm to zero")
    interval: int = Field(50, gt=0, description="optimizer steps between two decay steps")
    rectify: bool = True
    t_rate: float = Field(0.1, ge=0.0)
    t_len: float = Field(1.0, ge=0.0)
    backfill: bool = True
    cooldown: int = Field(1, ge=0, description="events a released structure is not selected again")
    norm_scope: Literal["out", "group"] = "out"
    momentum: Literal["keep", "reset"] = Field("keep", description="optimizer momentum of decaying slices")


class SparseLearningConfig(Strict):
    reg: float = Field(5e-4, gt=0.0)
    alpha: float = Field(4.0, ge=0.0, description="regularisation spread: weakest groups get 2**alpha times reg")


class FGGPConfig(Strict):
    granularity: Literal["unstructured", "2:4", "structured"] = "unstructured"
    sparsity: float = Field(0.9, gt=0.0, lt=1.0, description="final sparsity s_f (unstructured)")
    initial_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    start: float = Field(0.0, ge=0.0, lt=1.0, description="t0 as a fraction of training")
    end: float = Field(0.8, gt=0.0, le=1.0, description="t1 as a fraction of training")
    interval: int = Field(100, gt=0, description="iterations between pruning events")
    grad_fraction: float = Field(0.5, gt=0.0, le=1.0, description="r: fraction with the smallest |grad|")
    selection: Literal["gradient-first", "magnitude", "gradient"] = "gradient-first"
    prune_first_conv: bool = False
    prune_classifier: bool = True

    @model_validator(mode="after")
    def _window(self) -> "FGGPConfig":
        if self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be before end ({self.end})")
        if self.initial_sparsity >= self.sparsity:
            raise ValueError(f"initial_sparsity ({self.initial_sparsity}) must be below sparsity ({self.sparsity})")
        return self


class OCSPConfig(Strict):
    keep_floor: float = Field(0.25, gt=0.0, le=1.0, description="each layer keeps at least this fraction")
    cost_weighting: bool = True
    lag: int = Field(2, ge=1, description="compare kept sets with this many epochs earlier")
    window: int = Field(3, ge=1, description="epochs of smoothing of the stability indicator")
    threshold: float = Field(0.999, gt=0.0, le=1.0)
    reg_start: Union[Literal["auto"], int] = "auto"
    reg_init: float = Field(1e-4, ge=0.0)
    reg_delta: float = Field(1e-4, ge=0.0)
    reg_interval: int = Field(1, gt=0)
    plateau_tol: float = Field(1e-4, ge=0.0)
    plateau_epochs: int = Field(2, ge=1)
    latest_prune_epoch: Optional[int] = Field(None, ge=0)
    tolerance: float = Field(5e-4, gt=0.0)


MethodName = Literal["none", "oneshot", "iterative", "dpm", "fggp", "ocsp"]
HostName = Literal["depgraph", "depgraph-sl", "gate-decorator", "taylor"]


class PruneConfig(Strict):
    method: MethodName = "dpm"
    host: HostName = "depgraph"
    importance: ImportanceConfig = Field(default_factory=ImportanceConfig)
    target: TargetConfig = Field(default_factory=lambda: TargetConfig(macs=0.5))
    global_ranking: bool = Field(True, alias="global")
    round_to: Optional[Union[int, Literal["auto"]]] = Field(
        None, description="kept widths rounded up to a multiple of this; auto: what the bench/export targets run "
                          "fastest on (8 on AVX2 CPUs and GPUs, 16 with AVX-512, 32 for TensorRT INT8)")
    max_layer_ratio: float = Field(0.8, gt=0.0, le=1.0)
    # set by round_to.resolve_round_to when round_to was `auto` (narrow groups may keep a smaller power of two)
    _round_to_auto: bool = PrivateAttr(False)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    dpm: DPMConfig = Field(default_factory=DPMConfig)
    sparse_learning: SparseLearningConfig = Field(default_factory=SparseLearningConfig)
    fggp: FGGPConfig = Field(default_factory=FGGPConfig)
    ocsp: OCSPConfig = Field(default_factory=OCSPConfig)

    @field_validator("round_to", mode="before")
    @classmethod
    def _round_to(cls, v: Any) -> Any:
        if v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        raise ValueError("must be a positive whole number of channels (8, 16, ...), auto or null")


# ---------------------------------------------------------------------------------------------- training
class OptimizerConfig(Strict):
    kind: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    nesterov: bool = True
    betas: list[float] = Field([0.9, 0.999])

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("must be two numbers in [0, 1)")
        return v


class SchedulerConfig(Strict):
    kind: Literal["cosine", "multistep", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    milestones: list[float] = Field([0.5, 0.75], description="multistep: fractions of training in (0,1)")
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    min_lr_ratio: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("milestones")
    @classmethod
    def _milestones(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < m < 1.0 for m in v) or v != sorted(v):
            raise ValueError("must be increasing fractions of training in (0, 1)")
        return v


class DistillConfig(Strict):
    enabled: bool = False
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    temperature: float = Field(4.0, gt=0.0)


class FinetuneConfig(Strict):
    epochs: int = Field(10, ge=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    amp: bool = Field(False, description="mixed precision: float16 autocast with a gradient scaler on CUDA (gradients "
                                         "are unscaled before pruning hooks; overflow steps are skipped), bfloat16 "
                                         "autocast on CPU (fast only on CPUs with native bf16, e.g. AMX or "
                                         "AVX512-BF16; elsewhere it can be slower than float32)")
    grad_clip: Optional[float] = Field(None, gt=0.0)
    seed: int = 0


# ---------------------------------------------------------------------------------------------- export ...
class OnnxConfig(Strict):
    opset: int = Field(17, ge=11, le=23)
    dynamic_batch: bool = True
    simplify: bool = True
    dynamo: bool = False


class TensorRTConfig(Strict):
    enabled: Union[bool, Literal["auto"]] = "auto"
    fp16: bool = True
    int8: bool = False
    calib_samples: int = Field(512, gt=0)
    sparse: bool = False
    workspace_gb: float = Field(4.0, gt=0.0)


class ExportConfig(Strict):
    onnx: OnnxConfig = Field(default_factory=OnnxConfig)
    tensorrt: TensorRTConfig = Field(default_factory=TensorRTConfig)


class VerifyConfig(Strict):
    samples: int = Field(256, gt=0)
    atol: float = Field(1e-4, gt=0.0)
    rtol: float = Field(1e-6, ge=0.0, description="allowed max abs diff = atol + rtol * max |PyTorch output| "
                                                  "(untrained or unnormalised logits reach 1e5-1e12)")
    fp16_atol: float = Field(5e-2, gt=0.0, description="max abs diff allowed for an FP16 TensorRT engine")
    int8_atol: float = Field(0.5, gt=0.0, description="max abs diff allowed for an INT8 TensorRT engine")
    reduced_min_top1_agreement: float = Field(0.99, ge=0.0, le=1.0, description="top-1 agreement for FP16/INT8")
    min_top1_agreement: float = Field(0.999, ge=0.0, le=1.0)


BackendName = Literal["ort-cpu", "ort-cuda", "ort-trt", "tensorrt", "torch"]


class BenchConfig(Strict):
    backends: list[BackendName] = Field(["ort-cpu", "torch"])
    batch_sizes: list[int] = Field([1, 8])
    warmup_ms: float = Field(500.0, ge=0.0)
    min_runs: int = Field(50, gt=0)
    min_seconds: float = Field(2.0, ge=0.0)
    threads: Optional[int] = Field(None, gt=0)

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, v: list[int]) -> list[int]:
        if not v or any(b <= 0 for b in v):
            raise ValueError("must be a non-empty list of positive integers")
        return v


class GatesConfig(Strict):
    max_accuracy_drop: Optional[float] = Field(None, ge=0.0, description="percentage points of top-1")
    min_speedup: Optional[float] = Field(None, gt=0.0, description="latency speedup on the first bench backend")
    strict_schedule: bool = Field(False, description="a pruning schedule that cannot run as written within the "
                                                     "training budget (e.g. a DPM decay that would be forced at the "
                                                     "end) is a recipe error before training, not a warning")


class Recipe(Strict):
    name: str = Field(..., description="run name; the default output folder is runs/<name>")
    description: str = ""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names the run folder)")
        return v

    @model_validator(mode="after")
    def _cross(self) -> "Recipe":
        end = self.prune.schedule.end_epoch
        if end is not None and end > self.finetune.epochs:
            raise ValueError(
                f"prune.schedule.end_epoch ({end}) is after finetune.epochs ({self.finetune.epochs}); "
                "lower it or train longer"
            )
        if self.prune.schedule.start_epoch > (end if end is not None else self.finetune.epochs):
            raise ValueError("prune.schedule.start_epoch is after the schedule's end")
        if self.prune.method == "fggp" and self.prune.fggp.granularity != "structured":
            if self.finetune.epochs == 0:
                raise ValueError("method fggp prunes during training: finetune.epochs must be at least 1")
        return self

    def schedule_end_epoch(self) -> int:
        end = self.prune.schedule.end_epoch
        return end if end is not None else self.finetune.epochs // 2


# ---------------------------------------------------------------------------------------------- loading
def shipped_recipes() -> dict[str, Path]:
    """Recipes shipped in the repository's recipes/ folder, by name (file stem)."""
    if not RECIPES_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def resolve_recipe_path(ref: Union[str, Path]) -> Path:
    """A recipe file path, or the name of a shipped recipe."""
    path = Path(ref)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if str(ref) in shipped:
        return shipped[str(ref)]
    if path.is_dir():
        raise RecipeError(f"recipe {str(ref)!r} is a directory, not a recipe file; give the path of a .yaml file.")
    hint = did_you_mean(path.stem, tuple(shipped))
    raise RecipeError(
        f"recipe {str(ref)!r} not found: it is neither a file nor a shipped recipe{hint}.",
        hint="`compressor recipes list` shows the shipped recipes.",
    )


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping key given twice; `key` is its dotted path in the document, `lines` where it appears (1-based)."""

    def __init__(self, key: str, lines: tuple[int, int], mark: Any) -> None:
        self.key, self.lines = key, lines
        super().__init__(None, None, f"duplicated key {key!r} (lines {lines[0]} and {lines[1]})", mark)


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping key given twice (plain YAML silently keeps the last one), naming the
    key's dotted path (`finetune.epochs`) and both lines. Merge keys (`<<: *anchor`) may still be overridden."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._paths: dict[int, str] = {}
        self._index_paths(node, "")
        return super().construct_document(node)

    def _index_paths(self, node: yaml.Node, prefix: str) -> None:
        """Record the dotted path of every mapping node (aliases are visited once)."""
        stack = [(node, prefix)]
        while stack:
            current, where = stack.pop()
            if id(current) in self._paths:
                continue
            if isinstance(current, yaml.MappingNode):
                self._paths[id(current)] = where
                for key_node, value_node in current.value:
                    name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                    stack.append((value_node, f"{where}.{name}" if where else str(name)))
            elif isinstance(current, yaml.SequenceNode):
                self._paths[id(current)] = where
                stack.extend((item, f"{where}.{i}" if where else str(i)) for i, item in enumerate(current.value))

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    prefix = getattr(self, "_paths", {}).get(id(node), "")
                    raise DuplicateKeyError(f"{prefix}.{key}" if prefix else str(key), (first, line),
                                            key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_recipe_yaml(text: str) -> Any:
    """YAML text -> Python data with RecipeLoader (duplicated keys refused). Every recipe YAML goes through this."""
    return yaml.load(text, Loader=RecipeLoader)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """`line 3, column 7: expected ',' or ']'` from a PyYAML error, on one line."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = " ".join(filter(None, [getattr(exc, "context", None), getattr(exc, "problem", None)])) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(problem.split())


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (typed: 0.5, true, [1, 8])."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected key=value, e.g. --set finetune.epochs=3.")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"--set {assignment!r}: the key is empty.")
    try:
        value = yaml.load(raw, Loader=RecipeLoader) if raw.strip() else None
    except DuplicateKeyError as exc:
        raise RecipeError(f"--set {assignment!r}: the key {exc.key!r} appears twice in the value; keep one.") from exc
    except yaml.YAMLError:
        value = raw
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise RecipeError(f"--set {assignment!r}: {where} is a value ({child!r}), not a section.")
        node = child
    node[parts[-1]] = value


def _model_at(model: type[BaseModel], loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic model class reached by following `loc` through nested fields (None if not a model)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part) or next(
            (f for f in current.model_fields.values() if f.alias == part), None
        )
        if field is None:
            return None
        current = field.annotation
        args = [a for a in getattr(current, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        if args:
            current = args[0]
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _field_names(model: Optional[type[BaseModel]]) -> list[str]:
    if model is None:
        return []
    return [f.alias or name for name, f in model.model_fields.items()]


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: `dotted.field: what is wrong (got X; allowed: ...)`."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc) or "(recipe)"
        kind = err["type"]
        if kind == "extra_forbidden":
            allowed = _field_names(_model_at(Recipe, loc[:-1]))
            hint = did_you_mean(str(loc[-1]), allowed)
            lines.append(f"{dotted}: unknown key{hint}; allowed keys: {', '.join(allowed)}")
        elif kind == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            hint = did_you_mean(str(err["input"]), re.findall(r"'([^']+)'", expected))
            lines.append(f"{dotted}: {err['input']!r} is not allowed{hint}; allowed: {expected}")
        elif kind == "missing":
            lines.append(f"{dotted}: required but missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = f" (got {err['input']!r})" if not isinstance(err.get("input"), dict) else ""
            lines.append(f"{dotted}: {msg}{got}")
    return f"invalid recipe {source}:\n  " + "\n  ".join(lines)


def recipe_from_dict(data: Any, source: str = "<dict>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {source} must be a YAML mapping of sections (name, model, data, prune, ...), "
                          f"not a {_yaml_kind(data)}.")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source)) from exc


def _yaml_kind(data: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(data),
                                                                                              type(data).__name__)


def read_recipe_file(path: Path) -> Any:
    """The parsed YAML of a recipe file, or RecipeError naming the file (unreadable, not UTF-8 text, invalid YAML,
    a duplicated key)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}.") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe {path} is not a text file (byte {exc.start} is not UTF-8); a recipe is a YAML text "
                          "file: check the path, or save the file as UTF-8.") from exc
    try:
        return parse_recipe_yaml(text)
    except DuplicateKeyError as exc:
        first, second = exc.lines
        where = f"line {first}" if first == second else f"lines {first} and {second}"
        raise RecipeError(f"recipe {path}: the key {exc.key!r} is given twice ({where}); YAML would silently keep "
                          "the last one. Keep one of them.") from exc
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML ({_yaml_problem(exc)}).") from exc


def load_recipe(ref: Union[str, Path], overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """Load, override and validate a recipe file (or a shipped recipe's name)."""
    path = resolve_recipe_path(ref)
    data = read_recipe_file(path)
    if data is None and not overrides:
        raise RecipeError(f"recipe {path} is empty; a recipe needs at least `name:` "
                          "(`compressor recipes show NAME` prints a complete one to start from).")
    data = data if data is not None else {}
    if isinstance(data, dict):
        for assignment in overrides:
            apply_override(data, assignment)
    return recipe_from_dict(data, str(path))


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (defaults filled in) as YAML, loadable again with load_recipe."""
    data = json.loads(recipe.model_dump_json(by_alias=True))
    return yaml.safe_dump(data, sort_keys=False)


def recipe_schema() -> dict:
    return Recipe.model_json_schema(by_alias=True)
