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
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from compressor.config import Strict
from compressor.deploy.config import BenchConfig, ExportConfig, VerifyConfig
from compressor.errors import RecipeError
from compressor.models.config import ModelConfig
from compressor.prune.section import PruneConfig
from compressor.prune.spec import ModelSpec, PruneSpec, budget_problems
from compressor.registry import did_you_mean
from compressor.train.config import DataConfig, FinetuneConfig

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


class GatesConfig(Strict):
    max_accuracy_drop: Optional[float] = Field(None, ge=0.0, description="points of the task's primary metric: "
                                               "top-1 % (classification), mAP50-95 (detection), mIoU % "
                                               "(segmentation); tasks whose metric is higher-is-better")
    max_metric_increase: Optional[float] = Field(None, ge=0.0, description="a lower-is-better primary metric "
                                                 "(language-modeling: perplexity): the compressed model's relative "
                                                 "increase over the dense model's, e.g. 0.05 = within 5%")
    max_metric_drop: Optional[float] = Field(None, ge=0.0, description="the Python API's metric (compress(metric="
                                             "...), higher is better): dense minus compressed, in the metric's own "
                                             "units; needs a metric")
    min_speedup: Optional[float] = Field(None, gt=0.0, description="latency speedup on the first bench backend")
    strict_schedule: bool = Field(False, description="a pruning schedule that cannot run as written within the "
                                                     "training budget (e.g. a DPM decay that would be forced at the "
                                                     "end) is a recipe error before training, not a warning")


# the data kinds each non-classification task reads (python: the user's own datasets of the task's samples)
TASK_DATA = {"detection": ("coco", "yolo", "python"), "segmentation": ("masks", "python"),
             "language-modeling": ("text", "python")}


class Recipe(Strict):
    name: str = Field(..., description="run name; the default output folder is runs/<name>")
    description: str = ""
    task: Literal["classification", "detection", "segmentation", "language-modeling"] = Field(
        "classification", description="what the model predicts: its loss, metrics, protected layers and parity rule "
        "(compressor/tasks)")
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
        for problem in budget_problems(self.prune, self.finetune.epochs):
            raise ValueError(problem)
        target = self.prune.target
        if target.is_latency:
            if not self.bench.backends:
                raise ValueError("prune.target is a latency target, measured on a bench backend, but bench.backends "
                                 "is empty; list the runtime to measure on (e.g. bench.backends: [ort-cpu])")
            if target.backend is not None and target.backend not in self.bench.backends:
                raise ValueError(f"prune.target.backend {target.backend!r} is not in bench.backends "
                                 f"{list(self.bench.backends)}; add it there so the result is measured on it too")
            if target.batch is not None and target.batch not in self.bench.batch_sizes:
                raise ValueError(f"prune.target.batch {target.batch} is not in bench.batch_sizes "
                                 f"{list(self.bench.batch_sizes)}; add it there so the result is measured at it too")
        kinds = TASK_DATA.get(self.task)
        if kinds is not None and self.data.kind not in kinds:
            raise ValueError(f"task: {self.task} reads its data from data.kind {' or '.join(kinds)}, not "
                             f"{self.data.kind!r}; set data.kind (and its section) to the dataset's format")
        if self.task == "language-modeling":
            self._language_modeling()
        if self.task == "classification" and self.data.kind in ("coco", "yolo", "masks"):
            raise ValueError(f"data.kind {self.data.kind} holds boxes or masks, not class labels; set task: "
                             f"{'segmentation' if self.data.kind == 'masks' else 'detection'}")
        if self.export.nms.enabled and self.task != "detection":
            raise ValueError(f"export.nms.enabled puts a detector's NMS into its ONNX file, but task is {self.task}; "
                             "set export.nms.enabled: false (or task: detection for a detector)")
        self._metric_direction()
        if self.task == "language-modeling":
            self._lm_deployment()
        else:
            self._image_deployment()
        if self.export.quantize.exclude == "auto" and self.gates.max_accuracy_drop is None:
            raise ValueError("export.quantize.exclude: auto keeps layers in float until gates.max_accuracy_drop holds; "
                             "set gates.max_accuracy_drop (percentage points of top-1 from the dense model)")
        if self.export.quantize.exclude == "auto" and self.export.quantize.mode != "int8":
            raise ValueError("export.quantize.exclude: auto measures int8 sensitivity; use it with mode: int8")
        return self

    def _language_modeling(self) -> None:
        """A causal LM takes token ids; packed text blocks are model.input_shape long."""
        if self.model.inputs != "tokens":
            raise ValueError("task: language-modeling feeds token ids, but model.inputs is image; set model.inputs: "
                             "tokens and model.input_shape: [block size] (data.text.block_size)")
        block = self.data.text.block_size
        if self.data.kind == "text" and list(self.model.input_shape) != [block]:
            raise ValueError(f"model.input_shape {list(self.model.input_shape)} differs from data.text.block_size "
                             f"{block} (the length of the token blocks the corpus is packed into); set "
                             f"model.input_shape: [{block}] or data.text.block_size: {self.model.input_shape[0]}")

    def _metric_direction(self) -> None:
        """gates.max_accuracy_drop holds a higher-is-better primary metric, gates.max_metric_increase a
        lower-is-better one (perplexity)."""
        from compressor.tasks import TASKS

        task = TASKS.get(self.task)
        label = task.primary_label
        if not task.higher_is_better and self.gates.max_accuracy_drop is not None:
            raise ValueError(f"gates.max_accuracy_drop holds a metric that drops when the model gets worse, but "
                             f"task {self.task}'s {label} is lower-is-better; set gates.max_metric_increase instead "
                             f"(the relative increase of the {label} over the dense model's, e.g. 0.05 = within 5%)")
        if task.higher_is_better and self.gates.max_metric_increase is not None:
            raise ValueError(f"gates.max_metric_increase holds a lower-is-better metric (perplexity), but task "
                             f"{self.task}'s {label} is higher-is-better; set gates.max_accuracy_drop instead (points "
                             f"of {label} the compressed model may lose)")

    def _lm_deployment(self) -> None:
        """What a language model's deployment takes: weight-only int8 / int4, no calibration-based choices, ONNX
        Runtime (no TensorRT engine), a decode tokens/s latency target."""
        q, target = self.export.quantize, self.prune.target
        if q.mode == "fp16":
            raise ValueError("export.quantize.mode fp16 is not available for language models; use int8 or int4 "
                             "(weight-only MatMulNBits: 8- or 4-bit weights, activations in float)")
        if q.exclude == "auto":
            raise ValueError("export.quantize.exclude: auto measures static int8 sensitivity layer by layer, which "
                             "language models do not use (their int8 / int4 is weight-only MatMulNBits); leave "
                             "export.quantize.exclude empty")
        if q.qat.enabled is True:
            raise ValueError("export.quantize.qat is quantization-aware fine-tuning for static int8; a language "
                             "model's int8 / int4 is weight-only MatMulNBits without it; set "
                             "export.quantize.qat.enabled: auto or false")
        if self.export.tensorrt.enabled is True:
            raise ValueError("export.tensorrt.enabled: language models are deployed with their key/value cache on "
                             "ONNX Runtime; compressor builds no TensorRT engine for them; set "
                             "export.tensorrt.enabled: auto or false")
        if target.latency is not None or target.latency_speedup is not None:
            raise ValueError("prune.target latency / latency_speedup time one forward of an image model; a language "
                             "model's latency target is prune.target.tokens_per_second_speedup (decode tokens/s with "
                             "the key/value cache over the dense model's)")
        if target.tokens_per_second_speedup is not None and target.batch not in (None, 1):
            raise ValueError(f"prune.target.batch {target.batch}: a language model's decode is timed on one "
                             "sequence (batch 1); remove prune.target.batch")
        if target.tokens_per_second_speedup is not None and target.table is not None:
            raise ValueError("prune.target.table holds convolution and linear layer latencies of an image model; a "
                             "tokens_per_second_speedup target is measured end to end; remove prune.target.table")

    def _image_deployment(self) -> None:
        """Settings that only language models take."""
        for key in ("prompt_tokens", "new_tokens"):
            if getattr(self.bench, key) is not None:
                raise ValueError(f"bench.{key} sets the prompt / generated length of a language model's bench, but "
                                 f"task is {self.task}; remove bench.{key}")
        if self.export.quantize.mode == "int4":
            raise ValueError(f"export.quantize.mode int4 is weight-only 4-bit quantization of a language model's "
                             f"MatMuls; task {self.task} takes int8 (static QDQ) or fp16")
        if self.prune.target.tokens_per_second_speedup is not None:
            raise ValueError(f"prune.target.tokens_per_second_speedup is a language model's decode speed, but task "
                             f"is {self.task}; use prune.target.latency_speedup")

    def build_task(self):
        """The recipe's task (compressor/tasks) for the model's classes."""
        from compressor.tasks import build_task

        options: dict[str, Any] = {}
        if self.task == "classification":
            options["label_smoothing"] = self.finetune.label_smoothing
        if self.task == "segmentation" and getattr(self.data, "masks", None) is not None:
            options["ignore_index"] = self.data.masks.ignore_index
        return build_task(self.task, self.model.num_classes, **options)

    def prune_spec(self) -> PruneSpec:
        """What the pruning method is built from (`METHODS.get(name)(spec)`): the prune section (the same object,
        with round_to and a latency target as resolved), the model's example batch and ignored layers, the
        training budget and gates.strict_schedule."""
        from compressor.models.loading import example_inputs

        model = ModelSpec(example=example_inputs(self.model), ignore=list(self.model.ignore))
        return PruneSpec(prune=self.prune, model=model, epochs=self.finetune.epochs,
                         strict_schedule=self.gates.strict_schedule)


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


def format_validation_error(exc: ValidationError, source: str, *, root: Optional[type[BaseModel]] = None,
                            prefix: str = "", what: str = "recipe") -> str:
    """One line per problem: `dotted.field: what is wrong (got X; allowed: ...)`. `root` is the model validated
    (the Recipe unless told), `prefix` the dotted path of that model in a recipe (`prune`), `what` names it."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(loc)) or f"({what})"
        kind = err["type"]
        if kind == "extra_forbidden":
            allowed = _field_names(_model_at(root or Recipe, loc[:-1]))
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
    return f"invalid {what} {source}:\n  " + "\n  ".join(lines)


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


def as_recipe(recipe: Union[Recipe, dict, str, Path, None], overrides: tuple[str, ...] | list[str] = (), *,
              default_name: Optional[str] = None, who: str = "compress") -> Recipe:
    """The recipe the Python API was given: a Recipe, a file or shipped recipe's name, or a dict of sections (not
    changed; `name` defaults to `default_name` when given), with the `--set`-style `overrides` applied."""
    if recipe is None:
        from compressor.errors import UsageError

        raise UsageError(f"{who} needs a recipe: a YAML file, a shipped recipe's name, a Recipe or a dict of "
                         "sections (prune, finetune, export, verify, bench, gates).",
                         hint="`compressor recipes list` shows the shipped recipes.")
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe, list(overrides))
    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe
        data = json.loads(recipe.model_dump_json(by_alias=True))
    elif isinstance(recipe, dict):
        data = json.loads(json.dumps(recipe, default=str))  # a deep copy; Paths as strings
        if default_name is not None:
            data.setdefault("name", default_name)
    else:
        raise RecipeError(f"{who}: the recipe must be a file path, a shipped recipe's name, a Recipe or a dict, not "
                          f"a {type(recipe).__name__}.")
    for assignment in overrides:
        apply_override(data, assignment)
    return recipe_from_dict(data, "<dict>" if isinstance(recipe, dict) else f"{recipe.name} (with overrides)")


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (defaults filled in) as YAML, loadable again with load_recipe."""
    data = json.loads(recipe.model_dump_json(by_alias=True))
    return yaml.safe_dump(data, sort_keys=False)


def recipe_schema() -> dict:
    return Recipe.model_json_schema(by_alias=True)
