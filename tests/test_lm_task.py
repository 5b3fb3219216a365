"""Decoder language models (issue 34): the language-modeling task (shifted next-token loss, token-weighted
perplexity, KL distillation, logit parity), unlabelled text corpora packed into blocks, and hf:DIR causal LMs
(tiny random-init Llama and Qwen2 with grouped-query attention, a word-level tokenizer built offline)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from compressor.app.recipe import recipe_from_dict
from compressor.errors import DataError, ModelLoadError, RecipeError
from compressor.tasks import build_task, task_of_model
from compressor.tasks.language_modeling import IGNORE_INDEX, LanguageModelingEvaluator, compare_logits
from tests.conftest import invoke_cli, tiny_recipe

pytest.importorskip("transformers")

WORDS = ("the cat sat on a mat and the dog ran to the red ball while one bird sang in green trees near "
         "blue water by two old houses").split()
VOCAB = ["<unk>", "<eos>"] + sorted(set(WORDS))
VOCAB += [f"w{i}" for i in range(128 - len(VOCAB))]  # above compressor.tokens.TOKEN_ID_RANGE (random inputs)
BLOCK = 8


def _sentence(rng: np.random.RandomState, n: int) -> str:
    return " ".join(rng.choice(WORDS, n))


def _ids(text: str) -> list[int]:
    """The word-level tokenizer's ids by hand: one id per whitespace-separated word."""
    return [VOCAB.index(w) for w in text.split()]


def _tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def _llama(folder, family: str = "llama"):
    """A tiny random-init causal LM of `family` (Llama and Qwen2 with grouped-query attention: 4 query heads in 2
    key/value groups; GPT-2) and the tokenizer, saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=1)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(VOCAB), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                           bos_token_id=1, eos_token_id=1))
    else:
        model = (LlamaForCausalLM(LlamaConfig(**shape)) if family == "llama"
                 else Qwen2ForCausalLM(Qwen2Config(**shape, use_sliding_window=False)))
    model.save_pretrained(str(folder))
    _tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    rng = np.random.RandomState(0)
    for split, docs in (("train", 6), ("val", 3)):
        folder = root / split
        folder.mkdir()
        for i in range(docs):
            (folder / f"doc{i}.txt").write_text(_sentence(rng, 30) + "\n")
    return {"root": root, "llama": _llama(root / "llama"), "qwen": _llama(root / "qwen2", "qwen2"),
            "gpt2": _llama(root / "gpt2", "gpt2"), "train": root / "train", "val": root / "val"}


def _recipe(lm, **data) -> dict:
    text = {"train": str(lm["train"]), "val": str(lm["val"]), "block_size": BLOCK, **data}
    recipe = tiny_recipe(model={"arch": None, "inputs": "tokens", "input_shape": [BLOCK], "num_classes": 2},
                         data={"kind": "text", "batch_size": 4, "text": text},
                         finetune={"epochs": 1, "optimizer": {"kind": "adamw", "lr": 0.003, "weight_decay": 0.0}})
    recipe["task"] = "language-modeling"
    return recipe


def _load(lm, which: str = "llama"):
    from compressor.models.loading import load_model

    return load_model(f"hf:{lm[which]}", recipe_from_dict(_recipe(lm)).model)


# ---------------------------------------------------------------------------------------------- the task
def test_loss_is_the_shifted_next_token_cross_entropy():
    task = build_task("language-modeling", 0)
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(2))
    by_hand = [-torch.log_softmax(logits[n, t], -1)[ids[n, t + 1]] for n in range(2) for t in range(4)]
    assert torch.allclose(task.criterion(logits, ids), torch.stack(by_hand).mean())
    ids[0, 3] = IGNORE_INDEX  # not predicted: position 2's term drops out of the mean
    kept = [v for i, v in enumerate(by_hand) if i != 2]
    assert torch.allclose(task.criterion(logits, ids), torch.stack(kept).mean())
    with pytest.raises(DataError, match="do not fit targets of shape"):
        task.criterion(logits[:, :, 0], ids)


def test_perplexity_is_exp_of_the_token_weighted_nll_over_uneven_batches():
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(3, 4, 7, generator=gen) * 3, torch.randint(0, 7, (3, 4), generator=gen)),
               (torch.randn(1, 9, 7, generator=gen), torch.randint(0, 7, (1, 9), generator=gen))]
    whole, first, second = LanguageModelingEvaluator(), LanguageModelingEvaluator(), LanguageModelingEvaluator()
    nll, hits, tokens, per_batch = 0.0, 0, 0, []
    for (logits, ids), part in zip(batches, (first, second)):
        whole.update(logits, ids)
        part.update(logits, ids)
        pred, target = logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1)
        nll += float(F.cross_entropy(pred, target, reduction="sum"))
        hits += int((pred.argmax(-1) == target).sum())
        tokens += target.numel()
        per_batch.append(math.exp(float(F.cross_entropy(pred, target))))
    metrics = whole.compute()
    assert metrics["tokens"] == tokens == 3 * 3 + 8 and metrics["count"] == 4
    assert metrics["loss"] == pytest.approx(nll / tokens, rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-6)
    assert metrics["perplexity"] != pytest.approx(sum(per_batch) / 2, rel=1e-3)  # not a mean of batch perplexities
    assert metrics["token_acc"] == pytest.approx(100.0 * hits / tokens)
    # two DDP ranks, one batch each: gathering their sums gives the whole set's numbers
    ranks = first.compute(lambda mine: [mine, (second.nll, second.correct, second.tokens, second.blocks, 0.0)])
    assert ranks == pytest.approx(metrics)


def test_distillation_and_parity_of_logits():
    task = build_task("language-modeling", 0)
    gen = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 3, 5, generator=gen)
    t = 2.0
    by_hand = sum(float((F.softmax(teacher[n, i] / t, -1) * (F.log_softmax(teacher[n, i] / t, -1)
                                                              - F.log_softmax(student[n, i] / t, -1))).sum())
                  for n in range(2) for i in range(3)) / 6 * t * t
    assert float(task.distill(student, teacher, t)) == pytest.approx(by_hand, rel=1e-5)
    assert float(task.distill(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)

    ref = teacher.numpy()
    same = compare_logits([ref], [ref.copy()])
    assert same["max_abs_diff"] == 0.0 and same["top1_agreement"] == 1.0 and same["samples"] == 2
    swapped = ref.copy()
    swapped[0, 0] = -swapped[0, 0]  # one position's ranking changes
    off = compare_logits([ref], [swapped])
    assert off["top1_agreement"] == pytest.approx(5 / 6) and off["max_abs_reference"] == float(np.abs(ref).max())
    assert task.higher_is_better is False and task.describe()["higher_is_better"] is False
    assert build_task("classification", 3).higher_is_better is True
    inputs = task.random_inputs(recipe_from_dict(tiny_recipe(model={"arch": None, "inputs": "tokens",
                                                                     "input_shape": [12]})).model, 3)
    assert inputs.shape == (3, 12) and inputs.dtype == torch.int64 and 0 <= int(inputs.min()) and int(inputs.max()) < 100


# ---------------------------------------------------------------------------------------------- corpora
def test_a_folder_corpus_is_read_in_order_joined_with_eos_and_packed_into_full_blocks(lm, tmp_path):
    from compressor.train.text import load_tokenizer
    from compressor.train.text_corpus import corpus_blocks

    recipe = recipe_from_dict(_recipe(lm))
    tokenizer = load_tokenizer(recipe.data, f"hf:{lm['llama']}")
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / ".hidden").mkdir()
    docs = {"b.md": "the dog ran to the red ball", "a.txt": "the cat sat on a mat", "sub/c.py": "one bird sang",
            "z.TXT": "blue water by two old houses near green trees"}
    for name, text in docs.items():
        (corpus / name).write_text(text + "\n")
    (corpus / "sub" / "__init__.py").write_text("")  # empty: skipped
    (corpus / "notes.csv").write_text("the cat")  # not a listed extension
    (corpus / ".hidden" / "x.txt").write_text("the cat")  # hidden folder
    stream = []
    for name in sorted(docs):  # a.txt, b.md, sub/c.py, z.TXT
        stream += ([1] if stream else []) + _ids(docs[name])
    assert tokenizer("the cat sat", add_special_tokens=False)["input_ids"] == _ids("the cat sat")
    blocks = corpus_blocks(corpus, tokenizer, 5, recipe.data.text.extensions, "data.text.train")
    assert len(blocks) == len(stream) // 5 and blocks.tokens == len(stream) == 28 and blocks.documents == 4
    assert blocks.blocks.flatten().tolist() == stream[: len(blocks) * 5] and blocks.dropped == len(stream) % 5
    x, y = blocks[1]
    assert x.dtype == torch.int64 and x.tolist() == y.tolist() == stream[5:10]
    only_md = corpus_blocks(corpus, tokenizer, 3, ["md"], "data.text.train")
    assert only_md.blocks.flatten().tolist() == _ids(docs["b.md"])[:6]

    train, val = __import__("compressor.train.data", fromlist=["build_datasets"]).build_datasets(
        recipe.data, recipe.model, model_ref=f"hf:{lm['llama']}", task="language-modeling")
    assert train.block_size == BLOCK and len(train) == (6 * 30 + 5) // BLOCK and len(val) == (3 * 30 + 2) // BLOCK


def _bad(tmp_path, case: str):
    """(corpus path, the text the DataError must hold) of one bad corpus."""
    if case == "missing":
        return tmp_path / "nope.txt", "nope.txt does not exist"
    if case == "empty file":
        (tmp_path / "empty.txt").write_text("  \n")
        return tmp_path / "empty.txt", "empty.txt is empty"
    if case == "no matching files":
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "data.csv").write_text("the cat")
        return tmp_path / "folder", "holds no file ending in .md, .py, .rst, .txt"
    if case == "binary":
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "ok.txt").write_text("the cat sat")
        (tmp_path / "folder" / "weights.txt").write_bytes(b"\x89PNG\x00\x01\x02")
        return tmp_path / "folder", "weights.txt is binary, not text"
    if case == "latin-1":
        (tmp_path / "latin.txt").write_bytes("the caf\u00e9 sat".encode("latin-1"))
        return tmp_path / "latin.txt", "latin.txt is not UTF-8 text (byte 7 is 0xe9)"
    (tmp_path / "short.txt").write_text("the cat sat on a mat")  # 6 tokens, block 8
    return tmp_path / "short.txt", "short.txt holds 6 tokens, fewer than one block of data.text.block_size 8"


@pytest.mark.parametrize("case", ["missing", "empty file", "no matching files", "binary", "latin-1", "too short"])
def test_a_bad_corpus_is_a_data_error_naming_the_file(lm, tmp_path, case):
    from compressor.train.data import build_datasets

    path, message = _bad(tmp_path, case)
    recipe = recipe_from_dict(_recipe(lm, val=str(path)))
    with pytest.raises(DataError, match="data.text.val: ") as info:
        build_datasets(recipe.data, recipe.model, model_ref=f"hf:{lm['llama']}", task="language-modeling")
    assert message in str(info.value)
    if case in ("missing", "empty file", "too short"):  # and through the CLI: exit 2, the message, no traceback
        recipe_file = tmp_path / "recipe.yaml"
        recipe_file.write_text(yaml.safe_dump(_recipe(lm, val=str(path))))
        result = invoke_cli("eval", f"hf:{lm['llama']}", "--recipe", str(recipe_file))
        assert result.returncode == 2, result.stdout + result.stderr
        assert message in " ".join(result.stderr.split()) and "Traceback" not in result.stderr


def test_the_recipe_checks_block_size_inputs_and_extensions(lm):
    recipe = recipe_from_dict(_recipe(lm, extensions=["TXT", ".Md"]))
    assert recipe.data.text.extensions == [".txt", ".md"] and recipe.build_task().name == "language-modeling"
    assert recipe_from_dict(tiny_recipe()).data.text.extensions == [".txt", ".md", ".py", ".rst"]
    with pytest.raises(RecipeError, match=r"model.input_shape \[8\] differs from data.text.block_size 16"):
        recipe_from_dict(_recipe(lm, block_size=16))
    with pytest.raises(RecipeError, match="block_size"):
        recipe_from_dict(_recipe(lm, block_size=1))
    with pytest.raises(RecipeError, match="extensions"):
        recipe_from_dict(_recipe(lm, extensions=[]))
    image = _recipe(lm)
    image["model"] = {"arch": None}
    with pytest.raises(RecipeError, match="language-modeling feeds token ids"):
        recipe_from_dict(image)
    coco = _recipe(lm)
    coco["data"]["kind"] = "coco"
    with pytest.raises(RecipeError, match="reads its data from data.kind text or python"):
        recipe_from_dict(coco)


# ---------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("family", ["llama", "qwen", "gpt2"])
def test_an_hf_causal_lm_loads_as_one_tensor_of_next_token_logits(lm, family):
    from transformers import AutoModelForCausalLM

    from compressor.models.hf_causal_lm import HFCausalLM

    model = _load(lm, family)
    assert isinstance(model, HFCausalLM)
    assert getattr(model.hf.config, "num_key_value_heads", 2) == 2 and model.hf.dtype == torch.float32
    assert model.protected_modules() == ["hf.lm_head"]
    assert task_of_model(model, 2).name == "language-modeling"
    ids = torch.randint(0, 100, (2, BLOCK))
    reference = AutoModelForCausalLM.from_pretrained(str(lm[family]), local_files_only=True).eval()
    with torch.no_grad():
        out = model(ids)
        assert isinstance(out, torch.Tensor) and out.shape == (2, BLOCK, len(VOCAB))
        assert torch.allclose(out, reference(input_ids=ids).logits, atol=1e-5)


def test_a_causal_lm_saves_back_with_save_pretrained(lm, tmp_path):
    from transformers import AutoModelForCausalLM

    from compressor.models.hf_causal_lm import save_pretrained_checked

    model = _load(lm)
    ids = torch.randint(0, 100, (2, BLOCK))
    saved = save_pretrained_checked(model, tmp_path / "hf", ids, tokenizer=_tokenizer(tmp_path / "tok"))
    assert saved["written"] and saved["max_abs_diff"] < 1e-5
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model(ids), atol=1e-5)


def test_encoder_decoder_lms_and_wrong_inputs_are_refused(lm, tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from compressor.models.loading import load_model

    T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
                               ).save_pretrained(str(tmp_path / "t5"))
    with pytest.raises(ModelLoadError, match="T5ForConditionalGeneration is an encoder-decoder") as info:
        load_model(f"hf:{tmp_path / 't5'}", recipe_from_dict(_recipe(lm)).model)
    assert "Llama, Qwen2, Qwen3, Mistral, Phi-3 and GPT-2" in info.value.hint
    with pytest.raises(RecipeError, match="embeds at most 64 positions"):
        load_model(f"hf:{lm['llama']}", recipe_from_dict(tiny_recipe(
            model={"arch": None, "inputs": "tokens", "input_shape": [80]})).model)


# ---------------------------------------------------------------------------------------------- training, eval
def test_fit_trains_a_tiny_llama_on_packed_blocks(lm):
    from compressor.train.data import build_datasets
    from compressor.train.loop import evaluate, fit

    recipe = recipe_from_dict(_recipe(lm))
    model = _load(lm)
    task = recipe.build_task()
    train, val = build_datasets(recipe.data, recipe.model, model_ref=f"hf:{lm['llama']}", task=recipe.task)
    train = torch.utils.data.Subset(train, range(8))  # 2 steps of 4 blocks
    batch = torch.stack([train[i][0] for i in range(8)])
    with torch.no_grad():
        before = float(task.criterion(model(batch), batch))
    result = fit(model, train, val, recipe.finetune, recipe.data, task=task)
    with torch.no_grad():
        after = float(task.criterion(model.eval()(batch), batch))
    assert len(result.history) == 1 and math.isfinite(result.history[0]["train_loss"])
    assert after < before, (before, after)
    final = evaluate(model, val, batch_size=4, task=task)
    assert final["perplexity"] == pytest.approx(math.exp(final["loss"])) and final["tokens"] == len(val) * (BLOCK - 1)
    assert result.final["val_perplexity"] == pytest.approx(final["perplexity"], rel=1e-5)


def test_compressor_eval_prints_the_perplexity(lm, tmp_path):
    from compressor.train.data import build_datasets
    from compressor.train.loop import evaluate

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(_recipe(lm)))
    result = invoke_cli("eval", f"hf:{lm['qwen']}", "--recipe", str(recipe_file), "--json", str(tmp_path / "m.json"))
    assert result.returncode == 0, result.stderr
    recipe = recipe_from_dict(_recipe(lm))
    _, val = build_datasets(recipe.data, recipe.model, model_ref=f"hf:{lm['qwen']}", task=recipe.task)
    expected = evaluate(_load(lm, "qwen"), val, task=recipe.build_task())
    assert expected["perplexity"] > 50  # random init over a 128-token vocabulary
    assert f"perplexity {expected['perplexity']:.3f}" in result.stdout and f"{len(val)} blocks of text" in result.stdout
