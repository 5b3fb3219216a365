"""Which Ultralytics model YAML a name means (a name Ultralytics ships, such as yolo11n.yaml, or a file path), read
offline: nothing is searched for online and nothing is downloaded."""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from compressor.errors import ModelLoadError
from compressor.registry import did_you_mean

DETECT_HEADS = ("Detect", "v10Detect")  # heads whose outputs are boxes and class scores only
SCALED = re.compile(r"(\d+)([nslmx])(.+)?$")  # Ultralytics' own rule: yolo11n.yaml is yolo11.yaml at scale n


@functools.lru_cache(maxsize=1)
def _shipped() -> dict[str, Path]:
    """File name -> path of every model YAML in the installed Ultralytics."""
    import ultralytics

    return {f.name: f for f in sorted((Path(ultralytics.__file__).parent / "cfg" / "models").rglob("*.yaml"))}


def detection_yamls() -> list[str]:
    """The detection model names Ultralytics ships, one entry per family: yolo11{n,s,m,l,x}.yaml, yolov9c.yaml."""
    import yaml

    names = []
    for file in _shipped().values():
        cfg = yaml.safe_load(file.read_text())
        if cfg["head"][-1][2] not in DETECT_HEADS:
            continue
        scales = list(cfg.get("scales") or {})
        stem = re.match(r"(yolo(?:e-)?v?\d+)(.*)$", file.stem)
        if len(scales) > 1 and stem:  # one file for every scale
            names.append(f"{stem.group(1)}{{{','.join(scales)}}}{stem.group(2)}.yaml")
        else:  # one file per scale (yolov10n.yaml) or no scales (yolov9c.yaml)
            names.append(file.name)
    return sorted(names)


def resolve_yaml(name: str) -> Path:
    """The path yaml_model_load is given for `name`: a YAML file as is; a shipped name (with its scale letter, the
    file may not exist under that name) in the folder of the YAML it scales."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = _shipped()
    if path.name == name and path.suffix == ".yaml":
        file = shipped.get(name) or shipped.get(SCALED.sub(r"\1\3", name))
        if file is not None:
            return file.parent / name
    if len(path.parts) > 1 or path.suffix == ".yml":
        raise ModelLoadError(f"Ultralytics model YAML {name!r} does not exist.",
                             hint="Give the path of a model YAML file, or a name Ultralytics ships such as "
                                  "yolo11n.yaml.")
    families = detection_yamls()
    raise ModelLoadError(
        f"unknown Ultralytics model YAML {name!r}{did_you_mean(name, list(shipped))}; the detection models this "
        f"Ultralytics ships: {', '.join(families)}.",
        hint="The letter after the version picks the scale (yolo11n.yaml is yolo11.yaml at scale n); a path to "
             "a model YAML file works too.")


def load_detection_yaml(name: str) -> dict[str, Any]:
    """The model dict of `name` (Ultralytics' yaml_model_load: scale from the name), refused with ModelLoadError
    unless its head is a plain detection head."""
    from ultralytics.nn.tasks import guess_model_task, yaml_model_load

    path = resolve_yaml(name)
    try:
        cfg = yaml_model_load(path)
        head = cfg["head"][-1][2]
    except Exception as exc:  # YAML syntax, a missing backbone/head section, an unreadable file
        raise ModelLoadError(f"cannot read Ultralytics model YAML {name!r} ({type(exc).__name__}: {exc}).",
                             hint="A model YAML has nc, backbone and head sections, as Ultralytics' own do.") from exc
    if head not in DETECT_HEADS:
        task = guess_model_task(cfg)
        raise ModelLoadError(
            f"{name} is an Ultralytics {task} model (head {head}); compressor wraps Ultralytics detection models, "
            f"whose head ({' or '.join(DETECT_HEADS)}) outputs boxes and class scores.",
            hint="Use a detection YAML such as yolo11n.yaml or yolov8n.yaml.")
    return cfg
