"""Every structured pruning method on decoder language models (prune.decoder, prune/decoder_snapshot.py,
prune/decoder_plan.py): tiny random-init Llama and Qwen2 with grouped-query attention, trained by train.loop.fit
with the language-modeling task on random token blocks. Depth (whole layers), key/value groups with their query
heads and MLP channels are removed as asked, uniformly (the result reloads with from_pretrained), MAC targets are met
by the analytic count, ratios that break the groups are recipe errors before training, the optimizer drops a removed
layer's parameters, and `compressor inspect` lists the decoder structures instead of tracing the model.

The Llama has hidden size 96 (8 query heads of 12 in 4 key/value groups): Llama's config wants the hidden size to be
a multiple of the query heads, so keeping 3 groups (6 heads) is a valid config there, and not at hidden size 64."""
from __future__ import annotations

import copy

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from compressor import Pruner  # noqa: E402
from compressor.app.recipe import recipe_from_dict  # noqa: E402
from compressor.errors import RecipeError  # noqa: E402
from compressor.models import decoder as D  # noqa: E402
from compressor.prune.methods import METHODS  # noqa: E402
from compressor.prune.planning import MISS_TOLERANCE  # noqa: E402
from tests.conftest import invoke_cli, tiny_recipe  # noqa: E402

VOCAB, BLOCK = 256, 16
SHAPE = dict(vocab_size=VOCAB, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=128, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
             pad_token_id=None)


def token_blocks():
    """data.factory: 8 training and 4 validation blocks of random token ids (inputs and targets are the block)."""
    ids = torch.randint(0, VOCAB, (12, BLOCK), generator=torch.Generator().manual_seed(0))
    return (torch.utils.data.TensorDataset(ids[:8], ids[:8]), torch.utils.data.TensorDataset(ids[8:], ids[8:]))


def _save(folder, family: str, hidden: int):
    cls, config_cls = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
                       "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config)}[family]
    torch.manual_seed(0)
    model = cls(config_cls(hidden_size=hidden, **SHAPE))
    with torch.no_grad():  # norms and biases off their 1 / 0 init, so every tensor matters to the scores
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    return {"llama": _save(root / "llama", "llama", 96), "qwen2": _save(root / "qwen2", "qwen2", 64),
            "llama64": _save(root / "llama64", "llama", 64)}


def _recipe(prune: dict, epochs: int = 1) -> dict:
    recipe = tiny_recipe(model={"arch": None, "inputs": "tokens", "input_shape": [BLOCK], "num_classes": 2},
                         data={"kind": "python", "factory": "tests.test_decoder_methods:token_blocks",
                               "batch_size": 4},
                         finetune={"epochs": epochs, "optimizer": {"kind": "adamw", "lr": 1e-3, "weight_decay": 0.0}},
                         prune=prune)
    recipe["task"] = "language-modeling"
    return recipe


def _run(dirs, family: str, prune: dict, epochs: int = 1):
    """fit() with the recipe's method on the model of `family`; returns (model, method, dense MACs)."""
    from compressor.models.loading import load_model
    from compressor.train.loop import fit

    recipe = recipe_from_dict(_recipe(prune, epochs))
    model = load_model(f"hf:{dirs[family]}", recipe.model)
    dense = D.decoder_macs(model, BLOCK)
    method = METHODS.get(recipe.prune.method)(recipe.prune_spec())
    train, val = token_blocks()
    fit(model, train, val, recipe.finetune, recipe.data, method=method, task=recipe.build_task())
    return model.eval(), method, dense


def _widths(model) -> set[tuple[int, int, int]]:
    return {(w["heads"], w["kv_heads"], w["intermediate"]) for w in D.layer_widths(model)}


def _assert_runs_with_cache(hf) -> None:
    """Logits agree with and without the cache, and 5 greedy tokens generated with it are the argmax sequence
    recomputed without it."""
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, use_cache=True).logits, hf(ids, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)
        hf.generation_config.pad_token_id = 0
        prompt = ids[:1, :6]
        cached = hf.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
        seq = prompt
        for _ in range(5):
            nxt = hf(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert cached.shape == (1, 11) and torch.equal(cached, seq)


# ---------------------------------------------------------------------------------------------- (a) depth
@pytest.mark.parametrize("method,extra", [
    ("oneshot", {}),
    ("dpm", {"schedule": {"events": 1, "end_epoch": 1}, "dpm": {"steps": 2, "interval": 1}}),
])
def test_a_quarter_of_the_layers_goes_and_the_rest_keep_consecutive_indices(dirs, method, extra):
    model, pruning, dense = _run(dirs, "llama", {"method": method, "target": {"channels": 0.25},
                                                 "decoder": {"kinds": ["layers"]}, **extra})
    layers = model.hf.model.layers
    assert len(layers) == 3 and model.hf.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]
    assert _widths(model) == {(8, 4, 128)}  # nothing else narrowed
    assert D.decoder_macs(model, BLOCK) < dense
    D.config_after(model.hf)
    _assert_runs_with_cache(model.hf)
    if method == "dpm":  # the layer's residual branch outputs decayed to zero before it was removed
        trace = [t for t in pruning.summary()["decay_trace"] if t["root"] == "hf.model.layers:layers"]
        assert len(trace) == 1 and trace[0]["outcome"] == "removed" and trace[0]["norms"][-1] == 0.0
        assert trace[0]["norms"][0] > 0.1


# ---------------------------------------------------------------------------------------------- block influence
def _quiet_layer_model(folder):
    """The Llama of `dirs` with layer 1 made nearly the identity on data while its output projections are the
    largest: its two norms scaled by 1e-3 (its branches write almost nothing), its o_proj / down_proj by 3 (the
    magnitude host ranks it first to keep)."""
    hf = transformers.LlamaForCausalLM.from_pretrained(str(folder))
    layer = hf.model.layers[1]
    with torch.no_grad():
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.mul_(1e-3)
        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
            proj.weight.mul_(3.0)
    return hf


def test_block_influence_is_one_minus_the_cosine_between_a_layers_input_and_output(dirs):
    from compressor.models.hf_causal_lm import HFCausalLM
    from compressor.prune.block_influence import block_influence

    hf = _quiet_layer_model(dirs["llama"]).eval()
    ids = token_blocks()[0].tensors[0]
    scores = block_influence(HFCausalLM(hf), [(ids[:4], ids[:4]), (ids[4:], ids[4:])])
    with torch.no_grad():  # hidden_states[i] enters layer i; the last one is after the final norm, so layers 0..2
        states = hf(ids, output_hidden_states=True, use_cache=False).hidden_states
    for i in range(3):
        cos = torch.nn.functional.cosine_similarity(states[i].flatten(0, 1), states[i + 1].flatten(0, 1), dim=-1)
        assert scores[i].item() == pytest.approx(float((1 - cos).mean()), rel=1e-4, abs=1e-6)
    assert scores.shape == (4,) and scores[1] < 1e-3 < scores[[0, 2, 3]].min()
    with pytest.raises(ValueError, match="at least one batch"):
        block_influence(HFCausalLM(hf), [])


@pytest.mark.parametrize("layer_importance,gone", [("block_influence", 1), ("host", None)])
def test_depth_pruning_by_block_influence_drops_the_layer_that_changes_the_hidden_state_least(
        dirs, tmp_path, layer_importance, gone):
    _quiet_layer_model(dirs["llama"]).save_pretrained(str(tmp_path / "quiet"))
    dirs = {**dirs, "quiet": tmp_path / "quiet"}
    from compressor.models.loading import load_model

    dense = load_model(f"hf:{dirs['quiet']}", recipe_from_dict(_recipe({})).model)
    q_weights = [layer.self_attn.q_proj.weight.detach().clone() for layer in dense.hf.model.layers]
    model, _, _ = _run(dirs, "quiet", {"method": "oneshot", "target": {"channels": 0.25},
                                       "decoder": {"kinds": ["layers"], "layer_importance": layer_importance}},
                       epochs=0)
    kept = [next(i for i, w in enumerate(q_weights) if torch.equal(w, layer.self_attn.q_proj.weight))
            for layer in model.hf.model.layers]
    assert len(kept) == 3
    if gone is not None:
        assert kept == [i for i in range(4) if i != gone]
    else:  # the magnitude of its enlarged output projections keeps it
        assert 1 in kept


def test_the_pruner_asks_for_calibration_batches_to_measure_block_influence(dirs):
    from compressor.errors import UsageError
    from compressor.models.loading import load_model

    model = load_model(f"hf:{dirs['llama']}", recipe_from_dict(_recipe({})).model)
    prune = {"method": "oneshot", "target": {"channels": 0.25},
             "decoder": {"kinds": ["layers"], "layer_importance": "block_influence"}}
    example = token_blocks()[0].tensors[0][:1]
    with pytest.raises(UsageError, match="block_influence measures the decoder layers .* give calibration"):
        Pruner(model, example, epochs=1, steps_per_epoch=2, prune=prune)
    ids = token_blocks()[0].tensors[0]
    Pruner(model, example, epochs=1, steps_per_epoch=2, prune=prune, calibration=[ids[:4]])  # no loss_fn needed


# ---------------------------------------------------------------------------------------------- (b) widths
WIDTH_METHODS = [
    ("oneshot", {}),
    ("iterative", {"host": "taylor", "schedule": {"events": 2, "end_epoch": 1}}),
    ("dpm", {"schedule": {"events": 1, "end_epoch": 1}, "dpm": {"steps": 2, "interval": 1}}),
    ("dpm", {"host": "otov2", "schedule": {"events": 1, "start_epoch": 1, "end_epoch": 1},
             "dpm": {"steps": 1, "interval": 1}}),
    ("oneshot", {"importance": {"kind": "random"}}),
    ("oneshot", {"importance": {"kind": "saliency"}}),
]


@pytest.mark.parametrize("method,extra", WIDTH_METHODS,
                         ids=["oneshot", "iterative-taylor", "dpm", "dpm-otov2", "random", "saliency"])
def test_mlp_channels_and_key_value_groups_go_as_the_ratios_say(dirs, method, extra, tmp_path):
    epochs = 2 if extra.get("host") == "otov2" else 1
    prune = {"method": method, "target": {"channels": 0.1},
             "decoder": {"kinds": ["mlp", "kv_groups"], "ratios": {"mlp": 0.5, "kv_groups": 0.25}}, **extra}
    model, _, _ = _run(dirs, "llama", prune, epochs=epochs)
    assert _widths(model) == {(6, 3, 64)}  # every layer: 3 key/value groups with their 6 query heads, 64 channels
    attn = model.hf.model.layers[0].self_attn
    assert attn.q_proj.out_features == 72 and attn.k_proj.out_features == 36 and attn.o_proj.in_features == 72
    _assert_runs_with_cache(model.hf)
    if method == "oneshot" and not extra:  # (e) the uniform result is an ordinary config: it reloads
        config = D.config_after(model.hf)
        assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (6, 3, 64)
        model.hf.save_pretrained(str(tmp_path / "pruned"))
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned")).eval()
        ids = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).logits, model(ids), rtol=0, atol=1e-5)


def test_qwen2_groups_keep_their_biases_and_query_heads(dirs):
    model, _, _ = _run(dirs, "qwen2", {"method": "oneshot", "target": {"channels": 0.5},
                                       "decoder": {"kinds": ["kv_groups", "mlp"]}})
    assert _widths(model) == {(4, 2, 64)}
    attn = model.hf.model.layers[2].self_attn
    assert attn.q_proj.bias.shape == (32,) and attn.k_proj.bias.shape == (16,) and attn.num_key_value_groups == 2
    assert D.config_after(model.hf).num_key_value_heads == 2
    _assert_runs_with_cache(model.hf)


# ---------------------------------------------------------------------------------------------- (d) MAC targets
@pytest.mark.parametrize("family,method,extra", [
    ("llama", "dpm", {"schedule": {"events": 2, "end_epoch": 1}, "dpm": {"steps": 1, "interval": 1}}),
    ("qwen2", "fggp", {"fggp": {"granularity": "structured", "interval": 1}}),
    ("llama", "ocsp", {"ocsp": {"latest_prune_epoch": 1}}),
    ("qwen2", "iterative", {"schedule": {"events": 2, "end_epoch": 1}, "decoder": {"kinds": ["layers", "mlp"]}}),
], ids=["dpm-llama", "fggp-qwen2", "ocsp-llama", "iterative-layers-mlp"])
def test_a_mac_target_is_met_by_the_analytic_count_with_uniform_widths(dirs, family, method, extra):
    epochs = 2 if method == "ocsp" else 1
    model, pruning, dense = _run(dirs, family, {"method": method, "target": {"macs": 0.6}, **extra}, epochs=epochs)
    achieved = D.decoder_macs(model, BLOCK) / dense
    assert abs(achieved - 0.6) <= MISS_TOLERANCE * 0.6, achieved
    assert len(_widths(model)) == 1  # uniform: every layer the same
    D.config_after(model.hf)
    events = pruning.summary()["events"]
    assert events[-1]["achieved_macs"] == pytest.approx(achieved, rel=1e-6)  # the method measured the same count


def test_per_layer_widths_rank_across_layers_and_do_not_reload(dirs):
    from compressor.models.loading import load_model
    from compressor.prune.importance import ImportanceConfig, build_scorer
    from compressor.prune.planning import constraints_from, plan_for_target
    from compressor.prune.removal import remove
    from compressor.prune.snapshot import recipe_snapshot

    recipe = recipe_from_dict(_recipe({"method": "oneshot", "target": {"macs": 0.5}, "decoder": {"uniform": False}}))
    model = load_model(f"hf:{dirs['qwen2']}", recipe.model)
    example = recipe.prune_spec().model.example
    snap = recipe_snapshot(model, example, recipe, build_scorer(ImportanceConfig(kind="magnitude")))
    for kind in ("kv_groups", "mlp"):  # scores normalised over every layer of a kind, not per layer
        scores = torch.cat([c.scores for c in snap.candidates if c.kind == kind])
        assert scores.mean() == pytest.approx(1.0, rel=1e-5)
    plan = plan_for_target(snap, recipe.prune.target, constraints_from(recipe))
    planned = snap.macs_after(plan)
    assert planned == D.decoder_macs(model, BLOCK, plan) and abs(planned / snap.total_macs - 0.5) <= MISS_TOLERANCE * 0.5
    remove(model, example, plan)
    assert D.decoder_macs(model, BLOCK) == planned == snap.macs_after(plan)  # the snapshot's cost stays its own
    assert len({w["intermediate"] for w in D.layer_widths(model)}) > 1
    with pytest.raises(RecipeError, match="layers of different widths"):
        D.config_after(model.hf)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_every_kind_at_once_meets_a_mac_target_and_reloads(dirs, family, tmp_path):
    """Layers, key/value groups, MLP and hidden channels planned together: the MACs within the tolerance, widths a
    config holds (Llama: the hidden size a multiple of the query heads), the same logits after from_pretrained."""
    from compressor.models.loading import load_model
    from compressor.prune.importance import ImportanceConfig, build_scorer
    from compressor.prune.planning import constraints_from, plan_for_target
    from compressor.prune.removal import remove
    from compressor.prune.snapshot import recipe_snapshot

    recipe = recipe_from_dict(_recipe({"method": "oneshot", "target": {"macs": 0.45},
                                       "decoder": {"kinds": ["layers", "kv_groups", "mlp", "hidden"]}}))
    model = load_model(f"hf:{dirs[family]}", recipe.model)
    example = recipe.prune_spec().model.example
    snap = recipe_snapshot(model, example, recipe, build_scorer(ImportanceConfig(kind="magnitude")))
    plan = plan_for_target(snap, recipe.prune.target, constraints_from(recipe))
    assert {c.kind for c in snap.candidates if plan.get(c.root)} == {"layers", "kv_groups", "mlp", "hidden"}
    remove(model, example, plan)
    assert abs(D.decoder_macs(model, BLOCK) / snap.total_macs - 0.45) <= MISS_TOLERANCE * 0.45
    config = D.config_after(model.hf)
    assert len(_widths(model)) == 1
    if family == "llama":  # Qwen2's config takes any hidden size beside its explicit head_dim
        assert config.hidden_size % config.num_attention_heads == 0
    model.hf.save_pretrained(str(tmp_path / "pruned"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(example).logits, model(example), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- (c) recipe errors
@pytest.mark.parametrize("family,prune,message", [
    ("llama", {"decoder": {"kinds": ["kv_groups"], "ratios": {"kv_groups": 0.3}}},
     r"prune.decoder.ratios.kv_groups 0.3 cannot be met on llama: each layer has 4 key/value heads with 2 query "
     r"heads each .* 1.2 groups, not a whole number. The nearest allowed: keep 2 key/value groups \(4 query heads; "
     r"ratio 0.5\) or keep 3 key/value groups \(6 query heads; ratio 0.25\)"),
    ("llama64", {"target": {"channels": 0.25}},  # 6 query heads do not divide Llama's hidden size 64
     r"prune.target.channels \(the fraction of key/value groups removed\) 0.25 .* keeping 3 of 4 key/value groups "
     r"is not a head count this config accepts. The nearest allowed: keep 2 key/value groups"),
    ("llama", {"decoder": {"kinds": ["layers"]}, "target": {"channels": 0.1}}, r"0.1 of 4 decoder layers is 0 layers"),
    ("llama", {"decoder": {"kinds": ["hidden", "mlp"], "ratios": {"hidden": 0.125}}},
     r"prune.decoder.ratios.hidden 0.125 leaves a hidden size of 84, which llama's config refuses with 8 attention "
     r"heads .*The hidden size \(84\) is not a multiple of the number of attention heads \(8\)"),
    ("llama", {"host": "gate-decorator"}, r"ranks by 'gate', which scores batch-norm scales"),
    ("llama", {"host": "depgraph-sl"}, r"depgraph-sl regularises torch-pruning's channel groups"),
    ("llama", {"attention": {"heads": True}}, r"prune.attention.heads / embed .* decoder language model"),
    ("llama", {"method": "ocsp", "target": {"macs": 0.8},
               "decoder": {"kinds": ["layers"], "layer_importance": "block_influence"}},
     r"layer_importance: block_influence ranks the layers at a host method's selection events; method ocsp"),
], ids=["kv-0.3", "heads-hidden-64", "no-layer", "hidden-84", "gate-decorator", "depgraph-sl", "attention-heads",
        "influence-ocsp"])
def test_what_cannot_be_met_is_a_recipe_error_before_training(dirs, family, prune, message):
    from compressor.models.loading import load_model
    from compressor.train.loop import fit

    recipe = recipe_from_dict(_recipe({"method": "oneshot", "target": {"channels": 0.5}, **prune}))
    model = load_model(f"hf:{dirs[family]}", recipe.model)
    before = copy.deepcopy(model.state_dict())
    train, val = token_blocks()
    with pytest.raises(RecipeError, match=message):
        fit(model, train, val, recipe.finetune, recipe.data, method=METHODS.get(recipe.prune.method)(
            recipe.prune_spec()), task=recipe.build_task())
    after = model.state_dict()  # no training step ran
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_prune_decoder_on_a_model_that_is_no_decoder_is_a_recipe_error():
    from compressor.prune.decoder_snapshot import check_decoder_recipe
    from compressor.prune.section import PruneConfig

    with pytest.raises(RecipeError, match="prune.decoder: Sequential is not a decoder language model"):
        check_decoder_recipe(torch.nn.Sequential(torch.nn.Linear(2, 2)),
                             PruneConfig.model_validate({"decoder": {"kinds": ["mlp"]}}))
    with pytest.raises(RecipeError, match="ratios names \\['hidden'\\], which kinds"):
        recipe_from_dict(_recipe({"decoder": {"kinds": ["mlp"], "ratios": {"hidden": 0.2}}}))
    with pytest.raises(RecipeError, match="layer_importance block_influence ranks whole layers, which kinds"):
        recipe_from_dict(_recipe({"decoder": {"kinds": ["mlp"], "layer_importance": "block_influence"}}))


# ---------------------------------------------------------------------------------------------- optimizer
def test_a_removed_layers_parameters_leave_the_optimizer_and_training_goes_on(dirs):
    from compressor.models.loading import load_model
    from compressor.tasks import build_task

    recipe = recipe_from_dict(_recipe({}))
    model = load_model(f"hf:{dirs['llama']}", recipe.model).train()
    task = build_task("language-modeling", 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    layers = list(model.hf.model.layers)
    pruner = Pruner(model, token_blocks()[0][0][0][None], epochs=2, steps_per_epoch=2, optimizer=optimizer,
                    prune={"method": "oneshot", "target": {"channels": 0.25},
                           "decoder": {"kinds": ["layers", "mlp"], "ratios": {"mlp": 0.5}},
                           "schedule": {"start_epoch": 1, "end_epoch": 2}})  # the event at step 2: Adam has state
    ids = token_blocks()[0].tensors[0][:4]
    for step in range(4):
        optimizer.zero_grad()
        loss = task.criterion(model(ids), ids)
        loss.backward()
        pruner.after_backward(loss)
        optimizer.step()
        pruner.after_step()
        if step == 1:  # the removal happened in this after_step
            gone = [layer for layer in layers if all(layer is not kept for kept in model.hf.model.layers)]
            assert len(gone) == 1 and len(model.hf.model.layers) == 3
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
            assert not in_optimizer & {id(p) for p in gone[0].parameters()}
            assert in_optimizer == {id(p) for p in model.parameters()}
            for p in model.parameters():  # Adam's moments follow the kept slices
                assert optimizer.state[p]["exp_avg"].shape == p.shape
            gate = model.hf.model.layers[0].mlp.gate_proj.weight
            before = gate.detach().clone()
    assert not torch.equal(before, gate.detach())  # the later steps trained the new parameters
    assert _widths(model) == {(8, 4, 64)} and torch.isfinite(loss)


def test_removal_renames_the_roots_of_later_layers():
    from compressor.prune.removal import follow_roots

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=32, **{**SHAPE, "vocab_size": 64}))
    roots = ["model.layers.3.mlp:channels", "model.layers.1.self_attn:kv_groups", "model.layers:layers"]
    renamed = follow_roots(model, roots)
    D.remove_layers(model, [1])
    assert renamed() == {"model.layers.3.mlp:channels": "model.layers.2.mlp:channels",
                         "model.layers.1.self_attn:kv_groups": None, "model.layers:layers": "model.layers:layers"}


# ---------------------------------------------------------------------------------------------- (f) inspect
def test_inspect_lists_the_decoder_structures_and_the_plan_without_tracing(dirs, tmp_path):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(_recipe({"method": "dpm", "target": {"channels": 0.5},
                                                   "decoder": {"kinds": ["layers", "kv_groups", "mlp"]}})))
    result = invoke_cli("inspect", f"hf:{dirs['llama']}", "--recipe", str(recipe_file), "--no-layers",
                        "--json", str(tmp_path / "inspect.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    out = " ".join(result.stdout.split())
    assert "10 decoder structure sites (prune.decoder)" in out and "hf.model.layers:layers" in out
    assert "decoder after pruning: 2 layers, hidden 96, per layer 4 query heads in 2 key/value groups, MLP 64" in out
    report = yaml.safe_load((tmp_path / "inspect.json").read_text())
    roots = {g["root"]: g["width"] for g in report["groups"]}
    assert roots["hf.model.layers:layers"] == 4 and roots["hf.model.layers.3.self_attn:kv_groups"] == 4
    assert roots["hf.model.layers.0.mlp:channels"] == 128 and roots["hf:hidden"] == 96
    assert report["prediction"]["macs_ratio"] < 0.5
    recipe_file.write_text(yaml.safe_dump(_recipe({"method": "oneshot", "target": {"channels": 0.3}})))
    bad = invoke_cli("inspect", f"hf:{dirs['llama']}", "--recipe", str(recipe_file), "--no-layers")
    assert bad.returncode == 2 and "The nearest allowed: keep 2 key/value groups" in " ".join(bad.stderr.split())


def test_a_dense_decoder_takes_a_pruned_state_dict_for_a_resume(dirs):
    """models/slim.conform_to_state_dict (resumes): the layers the state lacks go, widths, head counts, the RMSNorm
    epsilon of a smaller hidden size and the config follow, and the logits are the pruned model's."""
    from compressor.models.loading import load_model
    from compressor.models.slim import conform_to_state_dict

    recipe = recipe_from_dict(_recipe({}))
    pruned, fresh = (load_model(f"hf:{dirs['llama']}", recipe.model) for _ in range(2))
    D.remove_plan(pruned, {"hf.model.layers:layers": [3], "hf:hidden": list(range(0, 96, 8)),
                           **{f"hf.model.layers.{i}.self_attn:kv_groups": [i] for i in range(3)},
                           **{f"hf.model.layers.{i}.mlp:channels": list(range(20)) for i in range(3)}})
    state = pruned.state_dict()
    assert "hf:hidden" in conform_to_state_dict(fresh, state)
    fresh.load_state_dict(state)
    assert fresh.hf.config.to_dict() == pruned.hf.config.to_dict()
    assert fresh.hf.config.num_hidden_layers == 3 and fresh.hf.config.hidden_size == 84
    ids = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), pruned(ids), rtol=0, atol=0)
