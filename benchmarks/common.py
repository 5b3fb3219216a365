"""Helpers shared by the benchmark scripts: run compress quietly, format markdown tables, write results, and the
machinery of the coverage sweeps (zoo_coverage.py, timm_coverage.py): one model per child process with a time
limit, a JSON row store with a markdown table rewritten after every row, and the row of one inspect + compress."""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

from compressor.app.pipeline import compress
from compressor.app.recipe import load_recipe

RESULTS = Path(__file__).resolve().parent / "results"


def run_compress(checkpoint: str, recipe: str, out: Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """One `compressor compress` run (library call) with overrides; returns the report and its wall time."""
    start = time.perf_counter()
    report = compress(checkpoint, load_recipe(recipe, list(overrides)), out, overwrite=True)
    report["wall_s"] = time.perf_counter() - start
    return report


def cached_compress(checkpoint: str, recipe: str, out: Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """run_compress, or the report a finished (status ok) earlier run left in `out`, so long benchmarks resume and
    their training runs can be split over processes; the report carries its `run_dir`."""
    done = out / "report.json"
    if done.is_file() and json.loads(done.read_text()).get("status") == "ok":
        return json.loads(done.read_text()) | {"run_dir": str(out)}
    print(f"run {out}", flush=True)
    return run_compress(checkpoint, recipe, out, overrides) | {"run_dir": str(out)}


def latency(report: dict[str, Any], backend: str, batch: int) -> dict[str, Any]:
    return next(r for r in report["latency"] if r["backend"] == backend and r["batch_size"] == batch)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_result(name: str, text: str, echo: bool = True) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(text)
    if echo:
        print(text)
    return path


def onnx_speed(dense_onnx: Path, model_onnx: Path, batch: int, threads: int = 2, seconds: float = 2.0) -> dict[str, float]:
    """ORT-CPU p50 (ms) of a dense and a compressed ONNX timed interleaved, for runs benchmarked after the fact."""
    from compressor.deploy.timing import Budget, time_models

    (timed,) = time_models("ort-cpu", [dense_onnx, model_onnx], [batch], Budget(300, 100, seconds), threads=threads)
    dense_p50, p50 = timed.p50_ms
    return {"dense_p50": dense_p50, "p50": p50, "speedup": timed.speedup(1)}


def input_size(name: str) -> int:
    """The input size a torchvision classification model expects: a ViT's own image_size, else the crop size of
    its DEFAULT weights' transforms."""
    import torchvision

    model = torchvision.models.get_model(name, weights=None)
    if hasattr(model, "image_size"):  # VisionTransformer checks its input against this
        return int(model.image_size)
    crop = torchvision.models.get_model_weights(name).DEFAULT.transforms().crop_size
    return int(crop[0])


def zoo_overrides(name: str, size: int, macs: float, scheme: str = "torchvision") -> list[str]:
    """Overrides of the resnet50-imagenet-latency recipe for any torchvision (or, with scheme="timm", timm)
    classifier: no fine-tuning, synthetic data, every layer but the classifier prunable, a few parity samples."""
    return [f"model.arch={scheme}:{name}", "model.ignore=[]", f"model.input_shape=[3, {size}, {size}]",
            f"prune.target={{macs: {macs}}}", "verify.samples=4", "data.synthetic.val_size=8",
            "data.synthetic.train_size=8"]


def bench_overrides(threads: int, seconds: float, warmup_ms: int = 500, min_runs: int = 10) -> list[str]:
    """A short ORT-CPU batch-1 latency measurement (dense and slim interleaved) for a coverage sweep."""
    return ["bench.backends=[ort-cpu]", "bench.batch_sizes=[1]", f"bench.min_runs={min_runs}",
            f"bench.min_seconds={seconds}", f"bench.warmup_ms={warmup_ms}", f"bench.threads={threads}"]


def informative_init(name: str, path: Path, scheme: str = "torchvision") -> tuple[str, list[str]]:
    """torchvision (and some timm models) initialise layers to zero (a ViT's head): every output is then 0 and
    parity proves nothing. Such weights are redrawn (normal, std 0.02, seeded) into a state-dict checkpoint; other
    models run as `SCHEME:NAME`. Returns the checkpoint to compress and the redrawn layers."""
    import torch

    from compressor.models.loading import build_arch

    torch.manual_seed(0)
    model = build_arch(f"{scheme}:{name}", 1000, 3)
    zero = [n for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not m.weight.detach().any()]
    if not zero:
        return f"{scheme}:{name}", []
    for layer in zero:
        torch.nn.init.normal_(model.get_submodule(layer).weight, std=0.02)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return str(path), zero


def cell(row: dict, key: str, form: Callable[[Any], str] = str) -> str:
    """A table cell: row[key] formatted, or "-" where the row has no such field (a failed model)."""
    return form(row[key]) if row.get(key) is not None else "-"


def params_cell(row: dict) -> str:
    return f"{row['params_dense'] / 1e6:.1f} M → {row['params_slim'] / 1e6:.1f} M" if "params_slim" in row else "-"


def parity_fields(report: dict) -> dict:
    """The ONNX parity of a compress report as row fields: max abs diff, relative diff, whether it proves anything."""
    parity = report["parity"]["onnx"]
    return {"parity": parity["max_abs_diff"], "parity_rel": parity.get("relative_diff"),
            "parity_uninformative": parity.get("same_output_for_all", False)}


def parity_cell(row: dict) -> str:
    """Max abs diff, with the relative diff (diff / max |output|) for rows run since it is recorded."""
    if "parity" not in row:
        return "-"
    if row.get("parity_uninformative"):
        return f"{row['parity']:.1e} (same output for every sample: proves nothing)"
    rel = row.get("parity_rel")
    return f"{row['parity']:.1e}" + (f" ({rel:.0e})" if rel is not None else "")


class Shard:
    """`--shard K/N`: this process trains only every N-th configuration (from the K-th), so a benchmark's runs can
    be split over processes; a later run without --shard reuses them all and writes the table."""

    def __init__(self, spec: str | None) -> None:
        self.k, self.n = (int(v) for v in spec.split("/")) if spec else (0, 1)
        self.count = -1

    def mine(self) -> bool:
        self.count += 1
        return self.count % self.n == self.k


# ---------------------------------------------------------------------------------------------- coverage sweeps
COVERAGE_RECIPE = "resnet50-imagenet-latency"
MISS_TOLERANCE = 0.02  # compressor's own: a MAC result more than 2% (relative) from its target is reported
ARTIFACTS = ("*.onnx", "*.onnx.data", "*.pt", "*.safetensors")


def coverage_parser(doc: str, out: Path, timeout: int) -> argparse.ArgumentParser:
    """The command line every coverage sweep takes (its --one NAME runs a single model in this process)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="only these models (default: the script's list)")
    parser.add_argument("--macs", type=float, default=0.7, help="MAC target: fraction of the dense MACs kept")
    parser.add_argument("--timeout", type=int, default=timeout, help="seconds per model (its own process)")
    parser.add_argument("--rerun", action="store_true", help="run models that already have a row again")
    parser.add_argument("--no-bench", dest="bench", action="store_false", help="skip latency (a busy machine)")
    parser.add_argument("--keep-artifacts", dest="keep", action="store_true",
                        help="keep each run's ONNX files and weights (default: only the reports)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=out)
    return parser


def run_isolated(script: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """`python SCRIPT --one NAME` with the sweep's options, in a child process limited to args.timeout seconds.
    Returns the row the child printed (a line `ROW {json}`), or a row saying how it ended: a timeout, or a process
    that died without a row (killed for memory, a segfault), with the tail of its stderr and the fields the child
    announced before its work (lines `META {json}`: family, input size)."""
    cmd = [sys.executable, script, "--one", name, "--macs", str(args.macs), "--out", str(args.out)]
    cmd += ([] if args.bench else ["--no-bench"]) + (["--keep-artifacts"] if args.keep else [])
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        stdout, stderr = done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:  # its output so far comes as bytes, text=True or not
        stdout = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return {"model": name, **_meta(stdout), "status": f"timeout after {args.timeout} s", "seconds": args.timeout}
    lines = [line for line in stdout.splitlines() if line.startswith("ROW ")]
    if not lines:
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": name, **_meta(stdout), "status": f"process died (exit {done.returncode}): {tail}"[:300],
                "stderr_tail": stderr[-4000:], "seconds": round(time.perf_counter() - start, 1)}
    return json.loads(lines[-1][4:])


def _meta(stdout: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for line in stdout.splitlines():
        if line.startswith("META "):
            fields.update(json.loads(line[5:]))
    return fields


def print_meta(fields: dict[str, Any]) -> None:
    """What a child knows before its work starts, kept in its row even if it then times out or dies."""
    print("META " + json.dumps(fields), flush=True)


def print_row(row: dict[str, Any]) -> None:
    """The child's answer to run_isolated."""
    print("ROW " + json.dumps(row), flush=True)


def sweep(models: Iterable[str], store: Path, run: Callable[[str], dict[str, Any]],
          write_table: Callable[[dict[str, dict]], None], rerun: bool = False,
          show: Callable[[dict], Any] = lambda row: row["status"]) -> dict[str, dict]:
    """Run `run(name)` for every model without a row in `store` (all of them with rerun), saving the store and
    rewriting the table after every row, so a sweep stopped part-way still leaves both. Returns all rows."""
    rows = json.loads(store.read_text()) if store.is_file() else {}
    for name in models:
        if name in rows and not rerun:
            continue
        rows[name] = run(name)
        print(f"{name}: {show(rows[name])}", flush=True)
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(rows, indent=1))
        write_table(rows)
    write_table(rows)
    return rows


def status_counts(rows: Iterable[dict]) -> Counter:
    """Rows by the kind of their status: ok, ok target not met, not prunable, error, traceback, timeout, died."""
    def kind(status: str) -> str:
        for label in ("ok, target not met", "ok", "not prunable", "error", "traceback", "timeout", "process died"):
            if status.startswith(label):
                return label
        return status.split(":")[0]
    return Counter(kind(r["status"]) for r in rows)


def coverage_row(name: str, scheme: str, size: int, overrides: list[str], out: Path, keep: bool = False,
                 threads: int = 1) -> dict[str, Any]:
    """`compressor inspect` + `compressor compress` of SCHEME:NAME (library calls, in this process) as row fields:
    groups, MACs and params dense/slim, parity, latency, status, and for a MAC target missed by more than 2% a
    `why` computed from the inspection (inspect.json is kept next to report.json)."""
    import torch

    from compressor.app.inspection import inspect_checkpoint
    from compressor.app.pipeline import compress
    from compressor.app.recipe import load_recipe

    torch.set_num_threads(threads)
    row: dict[str, Any] = {"model": name, "input": size}
    start = time.perf_counter()
    init = out / f"{name}.init.pt"
    try:
        checkpoint, row["redrawn"] = informative_init(name, init, scheme)
        recipe = load_recipe(COVERAGE_RECIPE, overrides)
        (out / name / "inspect.json").unlink(missing_ok=True)
        inspection = inspect_checkpoint(checkpoint, recipe).to_dict()
        (out / name).mkdir(parents=True, exist_ok=True)  # kept for the rows compress then refuses, too
        (out / name / "inspect.json").write_text(json.dumps(inspection, indent=1, default=str))
        row["groups"] = len(inspection["groups"])
        if inspection.get("prediction"):
            row["predicted_macs_kept"] = inspection["prediction"].get("macs_ratio")
        report = compress(checkpoint, recipe, out / name, overwrite=True)
        target = report["target"]
        row.update(macs_dense=report["dense"]["macs"], macs_kept=report["compressed"]["macs"] / report["dense"]["macs"],
                   params_dense=report["dense"]["params"], params_slim=report["compressed"]["params"],
                   **parity_fields(report), status="ok" if target["met"] is not False else "ok, target not met")
        row["fixed_out"] = fixed_output_shares(inspection)
        row["uncounted"] = uncounted_layers(inspection)
        if target.get("asked_macs_ratio"):
            row["miss"] = target["achieved_macs_ratio"] / target["asked_macs_ratio"] - 1
            if abs(row["miss"]) > MISS_TOLERANCE:
                row["why"] = explain_miss(inspection, report)
        for timing in report["latency"]:
            row.update(speedup=timing["speedup"], realised=timing["realised_ratio"])
    except Exception as exc:  # a CompressorError is a verdict; anything else a defect (its traceback is kept)
        row.update(failure_fields(exc))
    finally:
        init.unlink(missing_ok=True)
        if not keep:  # 80 models' ONNX files and weights filled 60 GB: keep the reports only
            for pattern in ARTIFACTS:
                for artifact in (out / name).glob(pattern):
                    artifact.unlink()
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _where(frame: traceback.FrameSummary) -> str:
    """file:line of a frame, relative to site-packages or to this repository."""
    path = frame.filename
    for root in ("site-packages/", f"{Path(__file__).resolve().parents[1]}/"):
        if root in path:
            path = path.split(root, 1)[1]
    return f"{path}:{frame.lineno} ({frame.name})"


def failure_fields(exc: BaseException) -> dict[str, Any]:
    """A failed model as row fields. compressor's own errors (CompressorError) are verdicts: `not prunable: MSG`
    or `error: TYPE: MSG` (first line). Anything else escaped compressor as a traceback, a defect: `traceback:
    TYPE at FILE:LINE` of the innermost frame (and of the innermost compressor frame when that is another), with
    the message, both frames and the whole traceback text kept in the row."""
    from compressor.errors import CompressorError, NotPrunableError

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if isinstance(exc, CompressorError):
        first = (exc.render().splitlines() or [""])[0]
        status = (f"not prunable: {first}" if isinstance(exc, NotPrunableError)
                  else f"error: {type(exc).__name__}: {first}")
        fields = {"status": status[:600]}
        if exc.__cause__ is not None:  # the chained cause names the failing layer or library call
            fields["traceback"] = text
        return fields
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if "/compressor/" in f.filename.replace("\\", "/")]
    last = _where(frames[-1]) if frames else "?"
    frame = _where(own[-1]) if own else None
    status = f"traceback: {type(exc).__name__} at {last}" + (f" via {frame}" if frame and frame != last else "")
    message = (str(exc).strip().splitlines() or [""])[0][:300]
    return {"status": status, "error": f"{type(exc).__name__}: {message}", "frame": last, "compressor_frame": frame,
            "traceback": text}


LOCK_KINDS = (("attention", "attention"), ("grouped conv", "grouped convolution"), ("custom layer", "custom layer"),
              ("recurrent", "recurrent layer"), ("custom layer", "no torch-pruning handler"), ("channel split", "channel split"),
              ("index mapping", "torch-pruning maps"), ("unused", "not used in forward"),
              ("classifier", "coupled to an ignored layer"), ("input-side only", "only input-side"),
              ("bare parameter", "bare nn.Parameter"))


def lock_kind(reason: str) -> str:
    """The short kind of an `inspect` unprunable-layer reason."""
    return next((label for label, key in LOCK_KINDS if key in reason), "other")


def _sides(inspection: dict) -> dict[str, dict[str, list[int]]]:
    """{layer: {"out"|"in": [indices of the prunable groups that narrow that side]}} from inspect's groups."""
    sides: dict[str, dict[str, list[int]]] = {}
    for i, group in enumerate(inspection["groups"]):
        for member in group["coupled"]:
            match = re.fullmatch(r"(.*)\((out|in)\)", member)
            if match:
                sides.setdefault(match.group(1), {}).setdefault(match.group(2), []).append(i)
    return sides


def fixed_output_shares(inspection: dict) -> dict[str, float]:
    """Share of the dense MACs in layers whose outputs no prunable group narrows, by why (inspect's reasons: the
    classifier, attention widths, grouped convs, custom layers, channel splits...). Their MACs still shrink with
    pruned inputs; layers fixed on both sides do not shrink at all."""
    sides, total = _sides(inspection), max(inspection["macs"], 1)
    unprunable, ignored = inspection["unprunable"], set(inspection["ignored"])
    shares: Counter = Counter()
    for layer in inspection["layers"]:
        if "out" in sides.get(layer["name"], {}) or not layer["macs"]:
            continue
        kind = "classifier" if layer["name"] in ignored else lock_kind(unprunable.get(layer["name"], ""))
        shares[kind] += layer["macs"] / total
    return dict(shares.most_common())


def mac_floor(inspection: dict, round_to: int | None, max_ratio: float) -> tuple[float, float]:
    """(the fewest MACs pruning can reach, the largest single step) as fractions of the dense MACs, on compressor's
    own cost model: a layer's MACs scale with its kept output and input fractions (a depthwise conv, narrowed on
    both sides by one group, with one of them), every group cut as far as max_layer_ratio and round_to allow;
    MACs outside parametrised layers stay. The step is one round_to multiple of the group that moves most MACs."""
    sides, total = _sides(inspection), max(inspection["macs"], 1)
    keep = []
    for group in inspection["groups"]:
        width = group["width"]
        kept = math.ceil(width * (1 - max_ratio))
        if round_to:
            kept = max(round_to, math.ceil(kept / round_to) * round_to)
        keep.append(min(kept, width) / width)
    floor = total - sum(layer["macs"] for layer in inspection["layers"])
    moved = Counter()
    for layer in inspection["layers"]:
        side = sides.get(layer["name"], {})
        out_groups, in_groups = side.get("out", []), side.get("in", [])
        f_out = min((keep[i] for i in out_groups), default=1.0)
        f_in = min((keep[i] for i in in_groups), default=1.0)
        same = bool(out_groups) and set(out_groups) == set(in_groups)
        floor += layer["macs"] * (f_out if same else f_out * f_in)
        for i in set(out_groups) | set(in_groups):
            moved[i] += layer["macs"]
    step = max((moved[i] * (round_to or 1) / inspection["groups"][i]["width"] for i in moved), default=0.0)
    return floor / total, step / total


def uncounted_layers(inspection: dict) -> dict[str, int]:
    """{layer type: count} of conv / linear layers used in forward() that compressor's MAC count (torch-pruning's
    count_ops) gives 0 MACs: every share and ratio computed from it then leaves them out."""
    unused = {n for n, reason in inspection["unprunable"].items() if lock_kind(reason) == "unused"}
    return dict(Counter(layer["type"] for layer in inspection["layers"] if not layer["macs"] and layer["name"] not in
                        unused and re.search(r"Conv|Linear", layer["type"])))


def explain_miss(inspection: dict, report: dict) -> str:
    """Why a compress run kept more (or fewer) MACs than asked, in numbers from the inspection: the floor pruning
    can reach under max_layer_ratio / round_to, and the MACs in layers whose outputs are fixed, by reason; for an
    overshoot, the coarsest step and the pruning events' notes."""
    prune = report["recipe"]["prune"]
    round_to = report.get("round_to", {}).get("value", prune.get("round_to"))
    round_to = round_to if isinstance(round_to, int) else None
    target = report["target"]
    achieved, asked = target["achieved_macs_ratio"], target["asked_macs_ratio"]
    floor, step = mac_floor(inspection, round_to, prune["max_layer_ratio"])
    fixed = fixed_output_shares(inspection)
    locks = ", ".join(f"{kind} {share:.0%}" for kind, share in fixed.items() if share >= 0.005)
    head = f"{achieved:.3f} kept, {asked:.2f} asked ({achieved / asked - 1:+.0%})"
    limits = f"max_layer_ratio {prune['max_layer_ratio']}, round_to {round_to}"
    events = [n.split(": ", 1)[1] for n in report.get("notes", []) if n.startswith("pruning event")]
    if achieved > asked:
        if floor > asked * (1 + MISS_TOLERANCE):
            why = (f"{head}: unreachable, the floor is {floor:.2f} ({limits}); {sum(fixed.values()):.0%} of MACs in "
                   f"layers with fixed outputs ({locks or 'none'})")
        else:
            why = (f"{head}: the floor is {floor:.2f} ({limits}), below the target, so the plan stopped short "
                   f"(compressor); fixed outputs: {locks or 'none'}")
    else:
        why = (f"{head}: overshoot; the coarsest round_to step moves {step:.0%} of MACs "
               f"({len(inspection['groups'])} groups)")
    uncounted = uncounted_layers(inspection)
    if uncounted:
        why += ("; compressor's MAC count gives 0 MACs to " +
                ", ".join(f"{n} {kind}" for kind, n in uncounted.items()) + " (shares are of the counted MACs)")
    return why + (f"; pruning event: {events[0]}" if events else "")


def cpu_label() -> str:
    """This machine's CPU and the widest vector instructions it has, for the CPU column of a result."""
    import platform

    from compressor.deploy.bench import environment
    from compressor.deploy.hardware import cpu_flags

    flags = cpu_flags()
    isa = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX-512" if "avx512f" in flags else \
        "AVX2" if "avx2" in flags else platform.machine()
    return f"{environment()['cpu'] or platform.machine()} ({isa})"


def cpu_folder(label: str) -> str:
    """A results subfolder name for a CPU label: 'Intel(R) Xeon(R) Processor (AVX-512 VNNI)' -> 'intel-xeon-...'."""
    return "-".join("".join(c if c.isalnum() else " " for c in label.replace("(R)", "")).lower().split())


def cpu_description() -> str:
    """The CPU's model name and the vector extensions ONNX Runtime's kernels use, from /proc/cpuinfo."""
    import platform

    from compressor.deploy.bench import environment
    from compressor.deploy.hardware import cpu_flags

    flags = cpu_flags()
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "asimd")
    have = [f for f in wanted if f in flags]
    return f"{environment()['cpu'] or platform.machine()} ({', '.join(have) or 'no AVX2'})"
