"""compress / eval / export / bench of decoder language models end to end (issue 34): a tiny random-init Llama with
grouped-query attention (4 query heads in 2 key/value groups, vocabulary 256, MLP width 96: different, so the model
builder finds the LM head) and a word-level tokenizer, on a tiny corpus folder. The run writes hf/ (reloaded by a
process that never imports compressor), model.onnx / dense.onnx with their key/value caches (parity at two prompt
lengths), model.int4.onnx (weight-only MatMulNBits) and a prefill / decode tokens-per-second bench; perplexity is
lower-is-better throughout (gates.max_metric_increase)."""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from compressor.app.recipe import recipe_from_dict
from compressor.errors import RecipeError
from tests.conftest import REPO, invoke_cli

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime_genai")

VOCAB, BLOCK, PROMPT, NEW = 256, 16, 16, 4


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0", eos_token="w1")


def _llama(layers: int = 2):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, eos_token_id=1)
    return transformers.LlamaForCausalLM(config).eval()


def _recipe(lm) -> dict:
    return {"name": "lm", "task": "language-modeling", "model": {"inputs": "tokens", "input_shape": [BLOCK]},
            "data": {"kind": "text", "batch_size": 4,
                     "text": {"train": str(lm["train"]), "val": str(lm["val"]), "block_size": BLOCK}},
            "prune": {"method": "none"},
            "finetune": {"epochs": 1, "optimizer": {"kind": "adamw", "lr": 0.001, "weight_decay": 0.0}},
            "export": {"quantize": {"mode": "int4"}},
            "bench": {"backends": ["ort-cpu"], "batch_sizes": [1], "warmup_ms": 10, "min_runs": 3,
                      "min_seconds": 0.05, "prompt_tokens": PROMPT, "new_tokens": NEW}}


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-compress")
    _llama().save_pretrained(str(root / "llama"))
    _tokenizer().save_pretrained(str(root / "llama"))
    rng = np.random.RandomState(0)
    for split, docs in (("train", 4), ("val", 2)):
        (root / split).mkdir()
        for i in range(docs):
            (root / split / f"doc{i}.txt").write_text(" ".join(f"w{j}" for j in rng.randint(2, 60, 40)) + "\n")
    recipe = root / "recipe.yaml"
    lm = {"root": root, "llama": root / "llama", "train": root / "train", "val": root / "val", "recipe": recipe}
    recipe.write_text(yaml.safe_dump(_recipe(lm)))
    return lm


@pytest.fixture(scope="module")
def run(lm):
    out = lm["root"] / "run"
    result = invoke_cli("compress", f"hf:{lm['llama']}", "--recipe", lm["recipe"], "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    return {"out": out, "stdout": result.stdout, "report": json.loads((out / "report.json").read_text())}


RELOAD = """
import sys, numpy as np, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True).eval()
ids = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    np.save(sys.argv[3], model(input_ids=ids).logits.numpy())
assert not any(name == "compressor" or name.startswith("compressor.") for name in sys.modules), "compressor imported"
"""


def test_compress_writes_hf_folder_kv_cache_onnx_int4_and_a_decode_bench(run, lm, tmp_path):
    import onnx

    from compressor.deploy.lm_session import KV_SHAPES_KEY
    from compressor.models.loading import load_model

    out, report = run["out"], run["report"]
    assert report["status"] == "ok" and report["task"]["name"] == "language-modeling"
    d, c = report["dense"], report["compressed"]
    change = (c["perplexity"] - d["perplexity"]) / d["perplexity"]
    assert f"perplexity {d['perplexity']:.3f} -> {c['perplexity']:.3f} ({change:+.1%})" in run["stdout"]

    # hf/: from_pretrained in a process that never imports compressor gives the compressed model's logits
    assert report["exports"]["hf_pretrained"]["written"] and (out / "hf" / "tokenizer.json").is_file()
    ids = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "ids.npy", ids.numpy())
    reload = subprocess.run([sys.executable, "-c", RELOAD, str(out / "hf"), str(tmp_path / "ids.npy"),
                             str(tmp_path / "logits.npy")], capture_output=True, text=True, cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert reload.returncode == 0, reload.stderr
    recipe = recipe_from_dict(_recipe(lm))
    with torch.no_grad():
        ours = load_model(str(out), recipe.model)(ids).numpy()
    assert np.abs(np.load(tmp_path / "logits.npy") - ours).max() <= 1e-6

    # model.onnx and dense.onnx with their caches, by one exporter; parity of the cached decode at two lengths
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inputs = [i.name for i in graph.graph.input]
    assert inputs[:2] == ["input_ids", "attention_mask"]
    assert sorted(inputs[2:]) == sorted(f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value"))
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta[KV_SHAPES_KEY]) == [[2, 16], [2, 16]]
    exports = report["exports"]
    assert exports["onnx"]["exporter"] == exports["dense_onnx"]["exporter"] and exports["onnx"]["kv_cache"]
    parity = report["parity"]["onnx"]
    assert parity["passed"] and parity["same_greedy_tokens"] and parity["max_abs_diff"] < 1e-4
    assert len({r["prompt_length"] for r in parity["per_length"]}) == 2 and parity["rtol"] == 1e-3
    assert c["onnx_perplexity"] == pytest.approx(c["perplexity"], rel=1e-4)

    # model.int4.onnx: weight-only, checked with its stated tolerance, scored on the validation set
    q = report["quantized"]
    assert q["mode"] == "int4" and (out / "model.int4.onnx").is_file() and q["bytes"] < c["onnx_bytes"] / 2
    assert q["weight_only"]["bits"] == 4 and q["parity"]["rtol"] == 0.25 and q["parity"]["passed"]
    assert abs(q["perplexity"] / c["onnx_perplexity"] - 1) < 0.1

    # the bench: dense, compressed and int4 timed in turn; prefill ms and decode tokens/s with their speedups
    (row,) = report["latency"]
    assert (row["backend"], row["batch_size"], row["prompt_tokens"], row["new_tokens"]) == ("ort-cpu", 1, PROMPT, NEW)
    for side in ("dense", "compressed", "quantized"):
        assert row[side]["prefill_ms"] > 0 and row[side]["decode_tokens_per_second"] > 0
    assert row["speedup"] == row["decode_speedup"] == pytest.approx(
        row["compressed"]["decode_tokens_per_second"] / row["dense"]["decode_tokens_per_second"])
    assert row["prefill_speedup"] == pytest.approx(row["dense"]["prefill_ms"] / row["compressed"]["prefill_ms"])
    md = (out / "report.md").read_text()
    for text in ("decode tokens/s", "prefill ms", "`hf/`", "pruned int4", f"{change:+.1%}",
                 "Export parity (prefill and cached decode"):
        assert text in md, text
    assert "TensorRT engine skipped" not in md  # no engine is built for a language model, nor a note about it
    assert (out / "plot_latency.png").is_file()


def test_eval_and_bench_of_the_run_files(run, lm):
    out, report = run["out"], run["report"]
    result = invoke_cli("eval", out / "model.onnx", "--recipe", lm["recipe"])
    assert result.returncode == 0, result.stderr
    assert f"perplexity {report['compressed']['onnx_perplexity']:.3f}" in result.stdout
    result = invoke_cli("eval", f"hf:{out / 'hf'}", "--recipe", lm["recipe"])
    assert result.returncode == 0, result.stderr
    assert f"perplexity {report['compressed']['perplexity']:.3f}" in result.stdout
    # compressor bench of the LM file: prefill and decode tokens/s, torch never imported
    script = ("import sys\nfrom compressor.app.cli import main\n"
              f"sys.argv = ['compressor', 'bench', {str(out / 'model.onnx')!r}, '--baseline', "
              f"{str(out / 'dense.onnx')!r}, '--prompt-tokens', '8', '--new-tokens', '3', '--min-runs', '3', "
              "'--min-seconds', '0.05', '--warmup-ms', '10']\n"
              "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
              "assert 'torch' not in sys.modules, 'torch imported'\n")
    bench = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300,
                           env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "COLUMNS": "200",
                                "PYTHONPATH": str(REPO)})
    assert bench.returncode == 0, bench.stdout + bench.stderr
    assert "prefill of a 8-token prompt, then 3 greedy tokens" in bench.stdout and "decode tokens/s" in bench.stdout
    rows = [line for line in bench.stdout.splitlines() if "model.onnx" in line]
    assert rows and float(rows[0].split("│")[3]) > 0  # its tokens/s
    refused = invoke_cli("bench", out / "model.onnx", "--batch", "8")
    assert refused.returncode == 2 and "batch 1" in refused.stderr


def test_a_perplexity_gate_fails_with_exit_1(lm, tmp_path):
    """A learning rate of 1.0 wrecks the tiny model: its perplexity rises far beyond 5% of the dense model's."""
    out = tmp_path / "run"
    result = invoke_cli("compress", f"hf:{lm['llama']}", "--recipe", lm["recipe"], "--out", out,
                        "--set", "finetune.optimizer.lr=1.0", "--set", "gates.max_metric_increase=0.05",
                        "--set", "bench.backends=[]", "--set", "export.quantize.mode=none")
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    (gate,) = report["gates"]
    increase = report["compressed"]["perplexity"] / report["dense"]["perplexity"] - 1
    assert gate["name"] == "max_metric_increase" and math.isfinite(increase) and increase > 0.05
    assert gate["value"] == pytest.approx(increase) and not gate["passed"] and report["status"] == "failed: gates"
    assert "max_metric_increase" in result.stderr


def test_max_accuracy_drop_on_a_language_model_is_exit_2_naming_max_metric_increase(lm, tmp_path):
    result = invoke_cli("compress", f"hf:{lm['llama']}", "--recipe", lm["recipe"], "--out", tmp_path / "run",
                        "--set", "gates.max_accuracy_drop=1.0")
    assert result.returncode == 2 and "gates.max_metric_increase" in " ".join(result.stderr.split())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("task, change, message", [
    ("lm", {"gates": {"max_accuracy_drop": 1.0}}, "set gates.max_metric_increase instead"),
    ("lm", {"export": {"quantize": "fp16"}}, "fp16 is not available for language models"),
    ("lm", {"export": {"quantize": "auto"}}, "exclude: auto measures static int8 sensitivity"),
    ("lm", {"export": {"quantize": {"mode": "int8", "qat": {"enabled": True}}}}, "weight-only MatMulNBits without it"),
    ("lm", {"export": {"tensorrt": {"enabled": True}}}, "builds no TensorRT engine"),
    ("lm", {"prune": {"method": "none", "target": {"latency_speedup": 1.3}}}, "tokens_per_second_speedup"),
    ("image", {"gates": {"max_metric_increase": 0.05}}, "set gates.max_accuracy_drop instead"),
    ("image", {"export": {"quantize": "int4"}}, "int4 is weight-only 4-bit"),
    ("image", {"bench": {"prompt_tokens": 64}}, "remove bench.prompt_tokens"),
    ("image", {"bench": {"new_tokens": 8}}, "remove bench.new_tokens"),
    ("image", {"prune": {"method": "none", "target": {"tokens_per_second_speedup": 1.3}}},
     "use prune.target.latency_speedup"),
])
def test_recipe_fields_that_belong_to_one_kind_of_task(lm, task, change, message):
    from tests.conftest import tiny_recipe

    base = _recipe(lm) if task == "lm" else tiny_recipe()
    for section, values in change.items():
        base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(base)
    assert message in " ".join(str(info.value).split())


def test_lm_recipe_defaults_and_targets(lm):
    recipe = recipe_from_dict({**_recipe(lm), "bench": {"backends": ["ort-cpu"]}, "export": {"quantize": "int8"}})
    assert recipe.bench.lm_lengths == (128, 32) and recipe.export.quantize.mode == "int8"
    targeted = recipe_from_dict({**_recipe(lm), "prune": {"method": "none",
                                                          "target": {"tokens_per_second_speedup": 1.3}}})
    assert targeted.prune.target.is_latency and targeted.prune.target.asked_latency_speedup() == 1.3
    from compressor.prune.latency_target import tokens_target

    assert tokens_target(targeted) and not tokens_target(recipe)


def test_metric_change_and_gates_follow_the_direction_of_the_metric():
    from compressor.app.metric_change import arrow_text
    from compressor.app.pipeline import evaluate_gates
    from compressor.tasks import build_task

    lm_task, cls_task = build_task("language-modeling", 0), build_task("classification", 10)
    assert arrow_text(lm_task, 12.3, 12.9) == "perplexity 12.300 -> 12.900 (+4.9%)"
    assert arrow_text(cls_task, 93.41, 92.1) == "top-1 93.41% -> 92.10% (-1.31 pp)"
    report = {"task": lm_task.describe(), "dense": {"perplexity": 10.0}, "compressed": {"perplexity": 10.4},
              "quantized": {"mode": "int4", "perplexity": 10.6}}
    text = {"train": "t", "val": "v", "block_size": 8}
    gates = evaluate_gates(recipe_from_dict({"name": "g", "task": "language-modeling",
                                             "model": {"inputs": "tokens", "input_shape": [8]},
                                             "data": {"kind": "text", "text": text},
                                             "gates": {"max_metric_increase": 0.05}}), report)
    assert [(g["name"], round(g["value"], 6), g["passed"]) for g in gates] == [
        ("max_metric_increase", 0.04, True), ("max_metric_increase (int4 ONNX)", 0.06, False)]


@pytest.mark.parametrize("case", ["empty", "binary"])
def test_a_corpus_file_that_is_empty_or_binary_is_exit_2_through_compress(lm, tmp_path, case):
    bad = tmp_path / "corpus.txt"
    if case == "empty":
        bad.write_text("\n")
    else:
        bad.write_bytes(b"w2 w3\x00\x01\x02 w4")
    result = invoke_cli("compress", f"hf:{lm['llama']}", "--recipe", lm["recipe"], "--out", tmp_path / "run",
                        "--set", f"data.text.train={bad}")
    assert result.returncode == 2, result.stdout + result.stderr
    message = " ".join(result.stderr.split())
    assert "data.text.train" in message and "corpus.txt" in message
    assert ("is empty" if case == "empty" else "is binary, not text") in message
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "report.json").exists()


def test_export_verifies_the_cache_and_a_failed_parity_leaves_no_file(run, lm, tmp_path, monkeypatch):
    out = run["out"]
    result = invoke_cli("export", out, "--out", tmp_path / "lm.onnx")
    assert result.returncode == 0, result.stderr
    assert "prefill + cached decode within" in result.stdout and (tmp_path / "lm.onnx").is_file()
    monkeypatch.setattr("compressor.app.lm_deploy.PARITY_RTOL", 0.0)  # nothing but float-exact passes now
    tight = ("--set", "verify.atol=1e-12", "--set", "verify.rtol=0")
    result = invoke_cli("export", out, "--recipe", lm["recipe"], *tight, "--out", tmp_path / "bad.onnx")
    assert result.returncode == 1 and "disagrees with the PyTorch model" in " ".join(result.stderr.split())
    assert not (tmp_path / "bad.onnx").exists() and not (tmp_path / "bad.onnx.data").exists()
    result = invoke_cli("compress", f"hf:{lm['llama']}", "--recipe", lm["recipe"], *tight, "--out",
                        tmp_path / "run", "--set", "bench.backends=[]", "--set", "export.quantize.mode=none")
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "failed: parity" and not report["parity"]["onnx"]["passed"]


def test_decode_timer_measures_a_depth_pruned_model_faster(tmp_path):
    """The measuring side of a tokens_per_second_speedup target: a 4-layer Llama and its 1-layer copy (hand-pruned),
    both exported by the model builder, decoding in turn."""
    from compressor.deploy.lm_timing import DecodeTimer
    from compressor.deploy.timing import Budget, time_in_turn
    from compressor.models.decoder import remove_layers

    dense = _llama(layers=4)
    shallow = copy.deepcopy(dense)
    remove_layers(shallow, [1, 2, 3])
    timer = DecodeTimer(dense, tmp_path, prompt_tokens=PROMPT, new_tokens=8)
    try:
        reference, pruned = timer.pair(shallow, "try0")
        try:
            timed = time_in_turn([reference, pruned], 1, Budget(50.0, 5, 0.3))
        finally:
            pruned.close()
    finally:
        timer.close()
    assert set(timer.exporters) == {"genai"} and timed.speedup(1) > 1.3


def test_per_layer_widths_skip_hf_and_export_both_files_with_torch_onnx(lm, tmp_path):
    """deploy() of a hand-pruned model whose first MLP lost a third of its channels: no hf/ (a config holds one
    MLP width), the reason in the notes; model.onnx and dense.onnx both by torch.onnx, the cached decode matching."""
    from compressor.app.deployment import deploy
    from compressor.models.decoder import remove_mlp_channels
    from compressor.models.loading import load_model
    from compressor.train.data import build_datasets

    recipe = recipe_from_dict(_recipe(lm))
    dense = load_model(f"hf:{lm['llama']}", recipe.model)
    slim = copy.deepcopy(dense)
    remove_mlp_channels(slim, 0, range(32))
    _, val = build_datasets(recipe.data, recipe.model, model_ref=f"hf:{lm['llama']}", task=recipe.task)
    settings = {**_recipe(lm), "name": "per-layer"}
    settings["export"] = {"quantize": "none"}
    report = deploy(slim, torch.zeros(1, BLOCK, dtype=torch.long), tmp_path / "run", recipe=settings,
                    dense_model=dense, val_set=val)
    saved = report["exports"]["hf_pretrained"]
    assert not saved["written"] and "MLP width per layer [64, 96]" in saved["reason"]
    assert not (tmp_path / "run" / "hf").exists() and any("no save_pretrained folder" in n for n in report["notes"])
    assert report["exports"]["onnx"]["method"] == report["exports"]["dense_onnx"]["method"] == "torch"
    assert report["parity"]["onnx"]["passed"] and report["latency"][0]["decode_speedup"] > 0
    assert "No Hugging Face folder (hf/)" in (tmp_path / "run" / "report.md").read_text()


def test_an_unreachable_tokens_per_second_target_names_its_field():
    from compressor.prune.latency_target import unreachable_error

    reach = {"speedup": 1.06, "macs": 0.469, "planner": "macs", "at_floor": True, "widths": [[1, 2], [20, 96]],
             "floor_speedup": 1.06, "floor_macs": 0.469, "floor_without_round_to": 0.469,
             "floor_without_limits": 0.38, "round_to": None, "max_layer_ratio": 0.8, "ignore": []}
    record = {"asked_speedup": 1.3, "backend": "ort-cpu", "batch": 1, "tries": [{}, {}], "tolerance": 0.05,
              "measure": "decode tokens/s", "unreachable": reach}
    error = unreachable_error(record)
    assert "asks for a decode tokens/s speedup of x1.30" in error.message
    assert "Lower prune.target.tokens_per_second_speedup to at most 1.06" in error.hint
    del record["measure"]
    assert "Lower prune.target.latency_speedup" in unreachable_error(record).hint
