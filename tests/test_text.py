"""Text models end to end: hf:DIR sequence classifiers on token ids, the text data kind (CSV, JSONL, parquet),
unlabelled text labelled by the dense model, dynamic batch and sequence axes, save_pretrained output."""
from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from compressor.app.recipe import recipe_from_dict
from compressor.errors import DataError, RecipeError
from compressor.prune import heads as H
from tests.conftest import invoke_cli, tiny_recipe

pytest.importorskip("transformers")

TOPICS = {0: "cat dog bird fish horse cow".split(), 1: "red blue green yellow black white".split(),
          2: "one two three four five six".split()}
FILLER = "the a of and to in is it that was for on are with as his they be at".split()


def _tiny_bert_dir(folder):
    """A tiny BertForSequenceClassification and its WordPiece tokenizer, saved with save_pretrained."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = sorted({w for ws in TOPICS.values() for w in ws} | set(FILLER))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    vocab += [f"w{i}" for i in range(120 - len(vocab))]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(folder)
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def _rows(n: int, seed: int):
    rng, rows = random.Random(seed), []
    for _ in range(n):
        label = rng.randrange(3)
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 10))] + [rng.choice(TOPICS[label]) for _ in range(2)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def _write(path, rows):
    if path.suffix == ".csv":
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, sorted(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def text_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    model = _tiny_bert_dir(root / "bert")
    files = {split: _write(root / f"{split}.csv", _rows(n, seed)) for split, n, seed in
             (("train", 192, 0), ("val", 64, 1))}
    return {"root": root, "ref": f"hf:{model}", "train": files["train"], "val": files["val"]}


def _text_recipe(task, **sections):
    base = tiny_recipe(
        model={"arch": None, "inputs": "tokens", "input_shape": [24], "num_classes": 3},
        data={"kind": "text", "batch_size": 32, "text": {"train": str(task["train"]), "val": str(task["val"])}},
        prune={"method": "oneshot", "target": {"macs": 0.6}, "attention": {"heads": True}},
        finetune={"epochs": 1, "optimizer": {"kind": "adamw", "lr": 0.001}},
        bench={"backends": ["ort-cpu"], "batch_sizes": [1, 2]})
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return base


def test_a_text_model_compresses_exports_with_dynamic_axes_and_reloads(text_task, tmp_path):
    import onnxruntime as ort
    import yaml

    from compressor.app.pipeline import compress
    from compressor.models.slim import load_slim

    run = tmp_path / "run"
    report = compress(text_task["ref"], recipe_from_dict(_text_recipe(text_task)), run)
    heads = {k: v for k, v in report["compressed"]["widths"].items() if k.endswith(":heads")}
    assert len(heads) == 2 and sum(heads.values()) < 8, heads
    assert report["parity"]["onnx"]["passed"] and report["parity"]["onnx"]["max_abs_diff"] < 1e-4
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    assert report["exports"]["hf_pretrained"]["written"] is False
    assert "attention heads were pruned" in report["exports"]["hf_pretrained"]["reason"]
    assert {(r["backend"], r["batch_size"]) for r in report["latency"]} == {("ort-cpu", 1), ("ort-cpu", 2)}
    fusion = report["exports"]["ort_fusion"]
    assert fusion["model_type"] == "bert" and fusion["dense"].get("SkipLayerNormalization") == 4  # 2 per layer
    assert fusion["dense"]["Attention"] == fusion["compressed"]["Attention"] == 2  # one per layer, heads pruned
    assert "ONNX Runtime transformer fusions" in (run / "report.md").read_text()

    slim = load_slim(run)  # no pickle: rebuilt from the hf: reference in slim.json
    assert H.head_counts(slim) == heads
    session = ort.InferenceSession(str(run / "model.onnx"))
    (inp,) = session.get_inputs()
    assert inp.name == "input_ids" and inp.shape == ["batch", "sequence"] and inp.type == "tensor(int64)"
    ids = torch.randint(5, 120, (3, 7))  # another batch and sequence length than the export's
    ids[1, 4:] = 0  # right padding
    with torch.no_grad():
        expected = slim(ids).numpy()
    np.testing.assert_allclose(session.run(None, {"input_ids": ids.numpy()})[0], expected, atol=1e-4)

    unsized = invoke_cli("bench", str(run / "model.onnx"), "--batch", "1")
    assert unsized.returncode == 2 and "give --input-shape, e.g. 128 (the sequence length" in unsized.stderr
    timed = invoke_cli("bench", str(run / "model.onnx"), "--baseline", str(run / "dense.onnx"), "--input-shape", "16",
                       "--batch", "2", "--min-runs", "3", "--min-seconds", "0.05", "--warmup-ms", "10")
    assert timed.returncode == 0, timed.stderr

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(_text_recipe(text_task)))
    result = invoke_cli("eval", str(run), "--recipe", str(recipe_file))  # the tokenizer comes from run/tokenizer
    assert result.returncode == 0, result.stderr
    assert f"top-1 {report['compressed']['top1']:.2f}%" in result.stdout


@pytest.mark.parametrize("method,extra,epochs", [
    ("oneshot", {}, 1), ("dpm", {"schedule": {"events": 1, "end_epoch": 1}, "dpm": {"steps": 2, "interval": 1}}, 1),
    ("fggp", {"fggp": {"granularity": "structured", "interval": 1}}, 1),
    ("ocsp", {"ocsp": {"latest_prune_epoch": 1}}, 2)])
def test_the_embedding_width_compresses_exports_fuses_and_reloads(text_task, tmp_path, method, extra, epochs):
    """prune.attention.embed with heads: the residual stream narrows everywhere alike, the export matches, still
    fuses one Attention per layer, and the slim model reloads; save_pretrained says why it cannot describe it."""
    from compressor.app.pipeline import compress
    from compressor.models.slim import load_slim
    from tests.test_embed import _residual_widths

    recipe = _text_recipe(text_task, prune={"method": method, "target": {"macs": 0.5},
                                            "attention": {"heads": True, "embed": True}, **extra},
                          finetune={"epochs": epochs})
    run = tmp_path / "run"
    report = compress(text_task["ref"], recipe_from_dict(recipe), run)
    slim = load_slim(run)
    (width,) = _residual_widths(slim)
    assert width < 32, f"{method} kept the whole embedding width"
    assert report["compressed"]["macs"] / report["dense"]["macs"] == pytest.approx(0.5, abs=0.08)
    assert report["parity"]["onnx"]["passed"] and report["parity"]["onnx"]["max_abs_diff"] < 1e-4
    fusion = report["exports"]["ort_fusion"]
    assert fusion["compressed"]["Attention"] == 2 and fusion["compressed"]["SkipLayerNormalization"] == 4
    assert report["exports"]["hf_pretrained"]["written"] is False
    assert f"the embedding width was pruned (32 -> {width}" in report["exports"]["hf_pretrained"]["reason"]
    ids = torch.randint(5, 120, (2, 9))
    with torch.no_grad():
        import onnxruntime as ort

        session = ort.InferenceSession(str(run / "model.onnx"))
        np.testing.assert_allclose(session.run(None, {"input_ids": ids.numpy()})[0], slim(ids).numpy(), atol=1e-4)


def test_right_padding_does_not_change_the_logits(text_task):
    from compressor.models.config import ModelConfig
    from compressor.models.loading import load_model
    from compressor.train.text import trim_padding

    model = load_model(text_task["ref"], ModelConfig(num_classes=3, inputs="tokens", input_shape=[24])).eval()
    ids = torch.zeros(2, 24, dtype=torch.int64)
    ids[0, :6], ids[1, :9] = torch.arange(10, 16), torch.arange(20, 29)
    batch, labels = trim_padding([(ids[0], 1), (ids[1], 2)], pad_token_id=0)
    assert batch.shape == (2, 9) and labels.tolist() == [1, 2]
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model(ids), atol=1e-5, rtol=1e-5)
        alone = model(ids[:1, :6])
    torch.testing.assert_close(alone, model(ids)[:1], atol=1e-5, rtol=1e-5)


def test_unlabelled_text_is_labelled_by_the_dense_model(text_task, tmp_path):
    from compressor.app.pipeline import compress

    files = {s: _write(tmp_path / f"{s}.jsonl", [{"text": r["text"]} for r in _rows(n, seed)])
             for s, n, seed in (("train", 96, 2), ("val", 32, 3))}
    recipe = _text_recipe(text_task, data={"kind": "text", "batch_size": 32, "text": {
        "train": str(files["train"]), "val": str(files["val"]), "label_column": None}},
        finetune={"epochs": 1, "distill": {"enabled": True, "alpha": 1.0}}, bench={"backends": []})
    report = compress(text_task["ref"], recipe_from_dict(recipe), tmp_path / "run")
    assert report["dense"]["top1"] == 100.0  # agreement of the dense model with itself
    assert any("the dense model's predictions are the labels" in n for n in report["notes"])
    assert 0.0 <= report["compressed"]["top1"] <= 100.0
    recipe_file = _recipe_file(tmp_path, recipe)
    result = invoke_cli("eval", str(tmp_path / "run"), "--recipe", str(recipe_file))
    assert result.returncode == 2 and "is unlabelled (data.text.label_column: null)" in result.stderr


def _datasets(task, tmp_path, **text):
    from compressor.train.data import build_datasets

    recipe = recipe_from_dict(_text_recipe(task, data={"kind": "text", "text": {
        "train": str(task["train"]), "val": str(task["val"]), **text}}))
    return build_datasets(recipe.data, recipe.model, model_ref=task["ref"])


def test_text_files_in_three_formats_give_the_same_samples(text_task, tmp_path):
    rows = _rows(20, 5)
    csv_set, _ = _datasets(text_task, tmp_path, train=str(_write(tmp_path / "t.csv", rows)))
    json_set, _ = _datasets(text_task, tmp_path, train=str(_write(tmp_path / "t.jsonl", rows)))
    assert torch.equal(csv_set.ids, json_set.ids) and torch.equal(csv_set.labels, json_set.labels)
    assert csv_set.ids.shape == (20, 24) and csv_set.labels.tolist() == [r["label"] for r in rows]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    parquet_set, _ = _datasets(text_task, tmp_path, train=str(tmp_path / "t.parquet"))
    assert torch.equal(parquet_set.ids, csv_set.ids) and torch.equal(parquet_set.labels, csv_set.labels)


def test_string_labels_take_the_given_order_or_their_sorted_names(text_task, tmp_path):
    names = ["animal", "colour", "number"]
    rows = [{"text": r["text"], "label": names[r["label"]]} for r in _rows(30, 6)]
    path = _write(tmp_path / "named.jsonl", rows)
    train, val = _datasets(text_task, tmp_path, train=str(path), val=str(path))
    assert train.classes == names and train.labels.tolist() == [names.index(r["label"]) for r in rows]
    backwards, _ = _datasets(text_task, tmp_path, train=str(path), val=str(path), labels=names[::-1])
    assert backwards.labels.tolist() == [2 - i for i in train.labels.tolist()]


def test_a_byte_order_mark_and_integral_float_labels_are_read_as_meant(text_task, tmp_path):
    marked = tmp_path / "marked.csv"
    marked.write_text("\ufefftext,label\ncat dog,0\nred blue,1\n", encoding="utf-8")
    floats = _write(tmp_path / "floats.jsonl", [{"text": "cat dog", "label": 0.0}, {"text": "one two", "label": 2.0}])
    train, _ = _datasets(text_task, tmp_path, train=str(marked))
    assert train.labels.tolist() == [0, 1] and train.classes == []
    train, _ = _datasets(text_task, tmp_path, train=str(floats))
    assert train.labels.tolist() == [0, 2] and train.classes == []


def test_bad_text_data_names_the_field_and_the_fix(text_task, tmp_path):
    wrong_column = _write(tmp_path / "wrong.csv", [{"body": "a b", "label": 0}])
    with pytest.raises(DataError, match=r"row 1 of .*wrong.csv has no 'text' value \(columns: body, label\)"):
        _datasets(text_task, tmp_path, train=str(wrong_column))
    out_of_range = _write(tmp_path / "range.jsonl", [{"text": "a b", "label": 7}])
    with pytest.raises(DataError, match=r"class indices \[7\] outside \[0, 3\)"):
        _datasets(text_task, tmp_path, train=str(out_of_range))
    unknown = _write(tmp_path / "unknown.jsonl", [{"text": "a", "label": "cat"}, {"text": "b", "label": "dog"}])
    with pytest.raises(DataError, match=r"labels \['dog'\] that are not among the classes"):
        _datasets(text_task, tmp_path, train=str(unknown), labels=["cat", "cow", "hen"])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="data.text.train: notes.txt is not a CSV, JSONL or parquet file"):
        _datasets(text_task, tmp_path, train=str(tmp_path / "notes.txt"))
    with pytest.raises(DataError, match="data.text.val: .*missing.jsonl does not exist"):
        _datasets(text_task, tmp_path, val=str(tmp_path / "missing.jsonl"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": 0}\n{"text": \n')
    with pytest.raises(DataError, match="cannot be read as jsonl"):
        _datasets(text_task, tmp_path, train=str(broken))


def test_text_data_needs_token_inputs_and_a_tokenizer(text_task, tmp_path):
    from compressor.train.data import build_datasets

    recipe = recipe_from_dict(_text_recipe(text_task))
    with pytest.raises(RecipeError, match="neither an hf:DIR reference nor a compress run"):
        build_datasets(recipe.data, recipe.model, model_ref="zoo:resnet20")
    image = recipe_from_dict(_text_recipe(text_task, model={"inputs": "image", "input_shape": [3, 8, 8],
                                                            "in_channels": 3}))
    with pytest.raises(RecipeError, match="data.kind: text feeds token ids; the recipe has model.inputs: image"):
        build_datasets(image.data, image.model, model_ref=text_task["ref"])
    result = invoke_cli("eval", text_task["ref"], "--recipe", str(_recipe_file(tmp_path, _text_recipe(
        text_task, data={"kind": "text", "text": {"val": None}}))))
    assert result.returncode == 2 and "kind: text needs data.text.train and data.text.val" in result.stderr


def _recipe_file(tmp_path, recipe):
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _shrink_mlp(bert, keep: int) -> None:
    """Keep the first `keep` MLP channels of every layer (rows of intermediate.dense, columns of output.dense)."""
    for layer in bert.bert.encoder.layer:
        up, down = layer.intermediate.dense, layer.output.dense
        new_up, new_down = nn.Linear(up.in_features, keep), nn.Linear(keep, down.out_features)
        with torch.no_grad():
            new_up.weight.copy_(up.weight[:keep])
            new_up.bias.copy_(up.bias[:keep])
            new_down.weight.copy_(down.weight[:, :keep])
            new_down.bias.copy_(down.bias)
        layer.intermediate.dense, layer.output.dense = new_up, new_down


def test_save_pretrained_is_written_only_where_from_pretrained_rebuilds_the_model(text_task, tmp_path):
    from compressor.models.config import ModelConfig
    from compressor.models.hf_export import save_pretrained_checked
    from compressor.models.loading import load_model
    from transformers import AutoModelForSequenceClassification

    cfg = ModelConfig(num_classes=3, inputs="tokens", input_shape=[24])
    example = torch.randint(5, 120, (2, 24))
    model = load_model(text_task["ref"], cfg).eval()
    _shrink_mlp(model.model, 40)  # the same width in every layer: config.intermediate_size can say it
    result = save_pretrained_checked(model, tmp_path / "hf", example)
    assert result["written"] and result["max_abs_diff"] < 1e-5
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert reloaded.config.intermediate_size == 40
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=example, attention_mask=(example != 0).long()).logits,
                                   model(example))

    layer0 = model.model.bert.encoder.layer[0]
    layer0.intermediate.dense = nn.Linear(32, 30)
    layer0.output.dense = nn.Linear(30, 32)
    uneven = save_pretrained_checked(model, tmp_path / "hf", example)
    assert not uneven["written"] and not (tmp_path / "hf").exists()
    assert "bert.encoder.layer.0.intermediate.dense.weight is [30, 32] after pruning" in uneven["reason"]

    heads = load_model(text_task["ref"], cfg).eval()
    H.remove_heads(heads, "model.bert.encoder.layer.1.attention:heads", [0])
    pruned_heads = save_pretrained_checked(heads, tmp_path / "hf", example)
    assert not pruned_heads["written"] and "attention heads were pruned (3-4 per layer, config has 4)" in \
        pruned_heads["reason"]
