"""Export: ONNX (named I/O, dynamic batch, checker, optional onnxslim). TensorRT engines build from the ONNX."""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.deploy.attention_graph import fusable_attention
from compressor.deploy.config import OnnxConfig
from compressor.errors import ExportError
from compressor.rundir import publish

INPUT_NAME, OUTPUT_NAME = "input", "logits"
TOKENS_NAME = "input_ids"  # a text model's one input: int64 token ids (batch, sequence); the mask is derived inside


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, cfg: OnnxConfig, *,
                zipped: bool = False) -> dict[str, Any]:
    """Export `model` to `path` (written atomically), check it, and simplify it with onnxslim when asked. `zipped`:
    also measure the DEFLATE size (what unstructured zeros save; 24 s for ViT-B/16's two files, so only then).
    A model with an operator the TorchScript exporter has no ONNX form for is exported with dynamo instead (DINOv2
    with registers resizes its position embeddings with antialiasing whenever it is traced, even to their own size;
    torch.export does not take that branch): the result's `fallback` says why."""
    try:
        return _export(model, example, path, cfg, zipped)
    except ExportError as first:
        if cfg.dynamo or not isinstance(first.__cause__, torch.onnx.errors.UnsupportedOperatorError):
            raise
        try:
            result = _export(model, example, path, cfg.model_copy(update={"dynamo": True}), zipped)
        except ExportError as second:
            raise ExportError(f"{first.message} The dynamo exporter failed too: {second.message}",
                              hint=first.hint) from second
        return {**result, "fallback": "exported with dynamo: the TorchScript exporter has no ONNX form for an "
                                      f"operator of this model ({_first_line(first.__cause__)})"}


def _export(model: nn.Module, example: torch.Tensor, path: Path | str, cfg: OnnxConfig, zipped: bool) -> dict[str, Any]:
    import onnx

    path = Path(path)
    model = model.eval()
    example = example.contiguous()
    tokens = not example.is_floating_point()  # a text model's token ids: dynamic sequence axis too
    name = TOKENS_NAME if tokens else INPUT_NAME
    outputs, spatial = output_names(model), dynamic_size(model, example)
    axes = {0: "batch", 1: "sequence"} if tokens else {0: "batch"}
    out_axes = {0: "batch"}
    if spatial:  # a segmenter: any image size (outputs at the input's resolution)
        axes, out_axes = {**axes, 2: "height", 3: "width"}, {0: "batch", 2: "height", 3: "width"}
    if not (cfg.dynamic_batch or tokens):
        axes, out_axes = ({k: v for k, v in a.items() if k != 0} for a in (axes, out_axes))
    dynamic = {name: axes, **{o: out_axes for o in outputs}} if axes else None
    _check_space(path, _tensor_bytes(model))
    with _private_dir(path) as work:
        tmp = work / path.name  # the exporters name external-data files after the graph file and write them beside it
        try:
            with warnings.catch_warnings(), torch.no_grad(), _mha_fastpath(False), _eager_attention(model):
                warnings.simplefilter("ignore")
                if cfg.dynamo:
                    shapes = {}
                    if cfg.dynamic_batch:
                        shapes[0] = torch.export.Dim("batch", min=1)
                    if tokens:
                        shapes[1] = torch.export.Dim("sequence", min=2, max=int(example.shape[1]))
                    if spatial:
                        shapes[2], shapes[3] = torch.export.Dim("height", min=8), torch.export.Dim("width", min=8)
                    torch.onnx.export(model, (example,), str(tmp), input_names=[name], output_names=outputs,
                                      opset_version=cfg.opset, dynamo=True, external_data=_over_proto_limit(model),
                                      dynamic_shapes=(shapes,) if shapes else None)
                else:  # over 2 GB, this exporter writes one file per tensor beside the graph on its own
                    torch.onnx.export(model, (example,), str(tmp), input_names=[name], output_names=outputs,
                                      opset_version=cfg.opset, dynamo=False, dynamic_axes=dynamic,
                                      do_constant_folding=True)
        except Exception as exc:  # the exporters raise many unrelated types; all mean "this model did not export"
            if _disk_full(exc):
                raise _disk_error(path) from exc
            raise ExportError(f"ONNX export of the model failed ({type(exc).__name__}: {_first_line(exc)}).",
                              hint="Try export.onnx.dynamo: true, another export.onnx.opset, or check custom ops.",
                              ) from exc
        try:  # from the file: no second serialisation of the whole model, and models over 2 GB check too
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as exc:
            raise ExportError(f"the exported ONNX (opset {cfg.opset}) fails onnx.checker: {' '.join(str(exc).split())}",
                              hint="Try another export.onnx.opset (17 is the default).") from exc
        external = any(f.name != tmp.name for f in work.iterdir())
        simplified, simplify_note, attention = False, None, {}
        try:
            if external:  # over protobuf's 2 GB: one data file beside the graph; onnxslim needs the model in one proto
                nodes = consolidate_external_data(tmp)
            else:
                proto = onnx.load(str(tmp))
                attention = fusable_attention(proto)
                if cfg.simplify and attention["head_reshapes"]:
                    simplify_note = ("onnxslim skipped: the graph has attention in the pattern ONNX Runtime's "
                                     "transformer optimizer fuses, and onnxslim rewrites it beyond the optimizer's "
                                     "reach (docs/export-and-bench.md).")
                elif cfg.simplify:
                    proto, simplified, simplify_note = _simplify(proto)
                if simplified or attention.get("head_reshapes"):
                    onnx.save(proto, str(tmp))
                nodes = len(proto.graph.node)
        except OSError as exc:
            if _disk_full(exc):
                raise _disk_error(path) from exc
            raise
        data = data_file(path)
        remove_onnx(path)  # an earlier export here (its data file could be stale or mismatched)
        if external:
            publish(work / data.name)
            os.replace(work / data.name, data)
        publish(tmp)
        os.replace(tmp, path)  # the graph last: a graph file is only there when its data is
    return {"path": str(path), "opset": cfg.opset, "bytes": onnx_bytes(path),
            "external_data": data.name if external else None, "zipped_bytes": zipped_size(path) if zipped else None,
            "nodes": nodes, "simplified": simplified, "simplify_note": simplify_note,
            "attention_rewrites": attention,
            "dynamic_batch": cfg.dynamic_batch, "exporter": "dynamo" if cfg.dynamo else "torchscript"}


def output_names(model: nn.Module) -> list[str]:
    """The exported outputs' names: the model's `output_names` (a detector's boxes and scores), else "logits"."""
    return list(getattr(model, "output_names", None) or [OUTPUT_NAME])


def dynamic_size(model: nn.Module, example: torch.Tensor) -> bool:
    """Whether the export takes any image height and width: models that say so (`dynamic_size`, the segmenters)."""
    return bool(getattr(model, "dynamic_size", False)) and example.ndim == 4


PROTO_LIMIT = 2**31  # protobuf's hard limit on one serialised message: larger models keep their tensors outside


def _tensor_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _over_proto_limit(model: nn.Module) -> bool:
    return _tensor_bytes(model) > 0.9 * PROTO_LIMIT  # headroom for folded constants


def _check_space(path: Path, need: int) -> None:
    """Refuse before writing when the disk can not hold the model's tensors (plus 10%): a full disk otherwise
    surfaces as an exporter error deep inside torch."""
    import shutil

    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < 1.1 * need:
        raise ExportError(f"exporting {path} needs about {1.1 * need / 1e9:.2f} GB of disk (the model's tensors), but "
                          f"{path.parent} has {free / 1e9:.2f} GB free.",
                          hint="Free disk space or export to another --out directory.")


def _disk_full(exc: Exception) -> bool:
    import errno

    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _disk_error(path: Path) -> ExportError:
    return ExportError(f"the disk filled up while writing {path}; nothing was left there.",
                       hint="Free disk space or export to another --out directory.")


def data_file(path: str | Path) -> Path:
    """Where the tensors of a model over 2 GB live: `model.onnx.data` beside `model.onnx`."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def onnx_bytes(path: str | Path) -> int:
    """The size of an ONNX model on disk: the graph file plus its external-data file when it has one."""
    data = data_file(path)
    return Path(path).stat().st_size + (data.stat().st_size if data.is_file() else 0)


def remove_onnx(path: str | Path) -> None:
    Path(path).unlink(missing_ok=True)
    data_file(path).unlink(missing_ok=True)


def consolidate_external_data(graph: Path) -> int:
    """Rewrite an external-data model (the TorchScript exporter writes one file per tensor, named after the tensor, so
    two models in one directory would overwrite each other's weights) as the graph plus one `<graph>.data` file.
    Returns the node count."""
    import onnx

    proto = onnx.load(str(graph))  # with the tensors, in memory
    for part in graph.parent.iterdir():  # onnx appends to an existing data file: start from none
        if part.name != graph.name:
            part.unlink()
    onnx.save_model(proto, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_file(graph).name)  # tensors under 1 kB (shapes, axes) stay inline for shape inference
    onnx.checker.check_model(str(graph), full_check=True)
    return len(proto.graph.node)


@contextlib.contextmanager
def _private_dir(path: Path):
    """A temporary directory beside `path` (same file system, so the results move in with a rename), removed after."""
    import shutil
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _mha_fastpath(enabled: bool):
    """nn.MultiheadAttention's inference fast path is one fused op (aten::_native_multi_head_attention) that the
    ONNX exporters cannot translate; exporting through the plain path gives the same function."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


@contextlib.contextmanager
def _eager_attention(model: nn.Module):
    """Hugging Face models exported with their eager attention (matmul, softmax, matmul), the pattern ONNX Runtime's
    transformer optimizer fuses; their default SDPA path exports as a graph it does not match. Same function: the
    export's parity check compares the file with the model as the user runs it. Restored afterwards."""
    switched, inside = [], set()
    for module in model.modules():
        current = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if id(module) in inside or not hasattr(module, "set_attn_implementation") or current in (None, "eager"):
            continue
        try:
            module.set_attn_implementation("eager")  # transformers sets it on the whole model, submodels included
        except (ValueError, ImportError, AttributeError):  # a model without an eager path keeps its own
            continue
        switched.append((module, current))
        inside.update(id(m) for m in module.modules())
    try:
        yield
    finally:
        for module, current in reversed(switched):
            try:
                module.set_attn_implementation(current)
            except (ValueError, ImportError, AttributeError):  # a family that refuses to switch back (RT-DETR's
                module.config._attn_implementation = current  # "sdpa"): its recorded choice, as it was


def zipped_size(path: str | Path) -> int:
    """Size of the model (graph and external data) after DEFLATE (zlib level 9): what zeros from unstructured sparsity
    save on disk. Streamed, so a model over 2 GB is not read into memory at once."""
    import zlib

    packer, size = zlib.compressobj(9), 0
    for part in (Path(path), data_file(path)):
        if part.is_file():
            with part.open("rb") as fh:
                while chunk := fh.read(1 << 24):
                    size += len(packer.compress(chunk))
    return size + len(packer.flush())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _simplify(proto):
    """(graph, simplified, note): onnxslim's graph when it is installed and succeeds; otherwise the checked graph
    unchanged, with a note saying why (onnxslim absent, or the exception it raised)."""
    from compressor.progress import info

    try:
        import onnxslim
    except ImportError as exc:
        note = f"onnxslim not installed ({_first_line(exc)}): the ONNX model was not simplified (pip install onnxslim)."
        info(f"note: {note}")
        return proto, False, note
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return onnxslim.slim(proto), True, None
    except Exception as exc:  # onnxslim is an optional optimiser: a failure keeps the checked, unsimplified graph
        note = (f"onnxslim failed while simplifying ({type(exc).__name__}: {_first_line(exc)}); the unsimplified, "
                "checked ONNX model was kept (set export.onnx.simplify: false to skip onnxslim).")
        info(f"note: {note}")
        return proto, False, note
