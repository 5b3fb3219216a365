"""Decoder LM structures (models/decoder): layers, key/value groups, MLP channels and the hidden size of tiny random
Llama, Mistral, Qwen2, Qwen3, Phi-3 and GPT-2 models — what removal takes out, that the model still runs with and
without its KV cache, that zeroing a structure's slices then removing it changes nothing (the slices are exactly the
structure), the config after depth pruning, head-count errors, the MAC formula against torch's FLOP counter, and
reloading with from_pretrained in a process that never imports compressor."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

from compressor.errors import NotPrunableError, RecipeError  # noqa: E402
from compressor.models import decoder as D  # noqa: E402
from compressor.prune.importance import ImportanceConfig, build_scorer  # noqa: E402
from compressor.prune.slices import scale_channels  # noqa: E402

VOCAB, IDS = 100, torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(3))
NONE_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
              intermediate_size=128, max_position_embeddings=64, **NONE_TOKENS)


def tiny(family: str, **overrides) -> torch.nn.Module:
    """A tiny random-init causal LM of `family`; GPT-2 is multi-head (kv heads == heads)."""
    t = transformers
    if family == "gpt2":
        config = t.GPT2Config(vocab_size=VOCAB, n_embd=64, n_head=4, n_layer=3, n_inner=128, n_positions=64,
                              **{**NONE_TOKENS, **overrides})
        cls = t.GPT2LMHeadModel
    else:
        config_cls, cls = {"llama": (t.LlamaConfig, t.LlamaForCausalLM),
                           "mistral": (t.MistralConfig, t.MistralForCausalLM),
                           "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM), "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM),
                           "phi3": (t.Phi3Config, t.Phi3ForCausalLM)}[family]
        extra = {"head_dim": 16} if family == "qwen3" else {}
        config = config_cls(**{**COMMON, **extra, **overrides})
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # random init leaves biases and norm weights at 0 / 1: make every tensor matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.generation_config.pad_token_id = 0
    return model


def logits(model, ids=IDS, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


def assert_runs_with_cache(model) -> None:
    """Forward with and without the cache agree, and 5 greedy tokens generated with the cache are the argmax sequence
    recomputed without it."""
    torch.testing.assert_close(logits(model, use_cache=True), logits(model, use_cache=False), rtol=1e-5, atol=1e-5)
    prompt = IDS[:1, :6]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    seq = prompt
    for _ in range(5):
        seq = torch.cat([seq, logits(model, seq, use_cache=False)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert cached.shape == (1, 11) and torch.equal(cached, seq)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_zeroing_a_structure_then_removing_it_changes_nothing(family):
    """Each kind in turn: zeroing the site's out_only slices of one structure (what DPM decays) changes the logits,
    removing that structure afterwards gives the zeroed model's logits, and the model runs with its cache."""
    model = tiny(family)
    exact = {"kv_groups", "mlp", "layers"} | ({"hidden"} if family != "gpt2" else set())
    for kind, structure in (("kv_groups", 1), ("mlp", 5), ("hidden", 7), ("layers", 1)):
        site = next(s for s in D.decoder_sites(model, [kind]))
        width = site.width
        before = logits(model)
        scale_channels(site.slices(out_only=True), {structure: 0.0})
        zeroed = logits(model)
        assert (zeroed - before).abs().max() > 1e-3, kind
        site.remove([structure])
        assert site.width == width - 1
        after = logits(model)
        if kind in exact:
            torch.testing.assert_close(after, zeroed, rtol=0, atol=2e-5, msg=f"{family} {kind}")
        else:  # GPT-2's LayerNorm normalises over the channels it has: a different function (remove_hidden_channels)
            assert (after - zeroed).abs().max() > 1e-4
        assert_runs_with_cache(model)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 63


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_a_kv_group_takes_its_query_heads_along(family):
    model = tiny(family, num_attention_heads=8, num_key_value_heads=2)  # n_rep 4, head_dim 8
    attn = model.model.layers[1].self_attn
    d, rep = 8, 4
    if family == "phi3":
        w = attn.qkv_proj.weight.detach().clone()
        q, k, v = w[:64], w[64:80], w[80:96]
    else:
        q, k, v = (getattr(attn, p).weight.detach().clone() for p in ("q_proj", "k_proj", "v_proj"))
        biases = [getattr(attn, p).bias for p in ("q_proj", "k_proj", "v_proj")]
        biases = [b.detach().clone() if b is not None else None for b in biases]
    o = attn.o_proj.weight.detach().clone()
    D.remove_kv_groups(model, 1, [0])  # group 0: kv head 0 and query heads 0..3
    keep_q = slice(rep * d, 2 * rep * d)
    if family == "phi3":
        torch.testing.assert_close(attn.qkv_proj.weight, torch.cat([q[keep_q], k[d:], v[d:]]), rtol=0, atol=0)
        assert attn.num_key_value_heads == 1 and attn.config.num_attention_heads == 4  # its LayerConfig
        assert model.config.num_attention_heads == 8  # layers 0 and 2 keep 8
    else:
        assert torch.equal(attn.q_proj.weight, q[keep_q]) and torch.equal(attn.k_proj.weight, k[d:])
        assert torch.equal(attn.v_proj.weight, v[d:])
        if family == "qwen2":
            assert torch.equal(attn.q_proj.bias, biases[0][keep_q]) and torch.equal(attn.k_proj.bias, biases[1][d:])
    assert torch.equal(attn.o_proj.weight, o[:, keep_q])
    assert attn.num_key_value_groups == rep and attn.head_dim == d
    assert [w["heads"] for w in D.layer_widths(model)] == [8, 4, 8]
    assert_runs_with_cache(model)
    clone = copy.deepcopy(model)  # a dense teacher copy: LayerConfig survives deepcopy
    torch.testing.assert_close(logits(clone), logits(model), rtol=0, atol=0)


def test_gpt2_heads_go_one_by_one():
    model = tiny("gpt2")
    attn = model.transformer.h[0].attn
    w, b = attn.c_attn.weight.detach().clone(), attn.c_attn.bias.detach().clone()
    D.remove_kv_groups(model, 0, [2])
    cols = [c for part in range(3) for c in range(part * 64, part * 64 + 64) if not 32 <= c - part * 64 < 48]
    assert torch.equal(attn.c_attn.weight, w[:, cols]) and torch.equal(attn.c_attn.bias, b[cols])
    assert attn.num_heads == 3 and attn.split_size == 48 and attn.c_attn.nf == 144 and attn.c_proj.nx == 48
    assert_runs_with_cache(model)


def test_head_ratios_that_break_the_groups_name_the_nearest_allowed_counts():
    config = tiny("llama").config  # 2 kv groups of 2 query heads
    assert D.allowed_head_counts(config) == [(1, 2), (2, 4)]
    assert D.check_head_ratio(config, 0.5) == 1 and D.check_head_ratio(config, 0.0) == 2
    with pytest.raises(RecipeError) as err:
        D.check_head_ratio(config, 0.3)
    text = str(err.value)
    assert "0.6 groups, not a whole number" in text
    assert ("keep 1 key/value group (2 query heads; ratio 0.5) or keep 2 key/value groups (4 query heads; ratio 0)"
            in text)
    # Llama's config validation wants hidden_size divisible by the query heads: 10 heads do not divide 96
    llama = transformers.LlamaConfig(**{**COMMON, "hidden_size": 96, "num_attention_heads": 12,
                                        "num_key_value_heads": 6, "head_dim": 8})
    assert [k for k, _ in D.allowed_head_counts(llama)] == [1, 2, 3, 4, 6]
    with pytest.raises(RecipeError, match=r"keeping 5 of 6 .* keep 4 key/value groups \(8 query heads; ratio "
                                          r"0.333333\) or keep 6 key/value groups \(12 query heads; ratio 0\)"):
        D.check_head_ratio(llama, 1 / 6)
    assert [k for k, _ in D.allowed_head_counts(llama, hidden_size=64)] == [1, 2, 4]  # after removing hidden channels
    assert D.allowed_head_counts(tiny("gpt2").config) == [(4, 4)]  # n_embd / n_head is the head width
    assert D.allowed_head_counts(tiny("gpt2").config, hidden_size=48) == [(3, 3)]
    with pytest.raises(RecipeError, match="keep 1 key/value group"):
        D.check_head_ratio(config, 1.0)


def test_depth_pruning_renumbers_layers_and_keeps_the_sliding_window_layout():
    model = tiny("qwen2", num_hidden_layers=4, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    windows = [layer.self_attn.sliding_window for layer in model.model.layers]
    kept_modules = [model.model.layers[i] for i in (0, 3)]
    D.remove_layers(model, [1, 2])
    assert list(model.model.layers) == kept_modules
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [windows[0], windows[3]] == [None, 4]
    config = model.config
    assert config.num_hidden_layers == 2 and config.layer_types == ["full_attention", "sliding_attention"]
    assert config.max_window_layers == 1
    config.validate()
    assert [i for i, _ in D.decoder_layers(model)] == [0, 1]
    long_ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(logits(model, long_ids, use_cache=True), logits(model, long_ids, use_cache=False))
    assert_runs_with_cache(model)
    with pytest.raises(NotPrunableError, match="removing all 2 layers"):
        D.remove_layers(model, [0, 1])
    with pytest.raises(NotPrunableError, match="removing all 2 key/value groups"):
        D.remove_kv_groups(model, 0, [0, 1])
    with pytest.raises(NotPrunableError, match="no layer 5"):
        D.remove_mlp_channels(model, 5, [0])


def test_unsupported_models_are_refused_naming_the_supported_families():
    neox = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64))
    with pytest.raises(NotPrunableError,
                       match=r"model_type 'gpt_neox'.*supported: Llama, Mistral, Qwen2, Qwen3.*Phi-3.*GPT-2"):
        D.decoder_sites(neox)
    with pytest.raises(NotPrunableError, match="not a Hugging Face causal language model"):
        D.decoder_sites(torch.nn.Linear(2, 2))


def test_sites_plans_and_macs():
    """Roots through a wrapper, a plan resolved before layers renumber, slices scorers rank, and the MAC formula
    against torch's FLOP counter (eager attention: every matmul is an op it counts) before and after pruning."""
    from torch.utils.flop_counter import FlopCounterMode

    wrapper = torch.nn.Module()
    wrapper.lm = tiny("llama", attn_implementation="eager")
    roots = [s.root for s in D.decoder_sites(wrapper)]
    assert roots == ["lm.model.layers:layers", *[f"lm.model.layers.{i}.self_attn:kv_groups" for i in range(3)],
                     *[f"lm.model.layers.{i}.mlp:channels" for i in range(3)], "lm:hidden"]
    assert all(D.is_decoder_root(r) for r in roots)
    layers = D.site_of(wrapper, "lm.model.layers:layers")
    out_only = layers.slices(out_only=True)
    writers = [m for layer in wrapper.lm.model.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    assert {id(sl.param) for sl, _ in out_only} == {id(m.weight) for m in writers}
    scorer = build_scorer(ImportanceConfig(kind="magnitude"))
    for site in D.decoder_sites(wrapper):
        assert scorer.slices(site.slices(out_only=False), site.width).shape == (site.width,)

    def counted(model, length):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, length, dtype=torch.long))
        return counter.get_total_flops() / 2

    L = 12
    assert D.decoder_macs(wrapper, L) == counted(wrapper.lm, L)
    kv = D.site_of(wrapper, "lm.model.layers.2.self_attn:kv_groups")
    d, H, rep = 16, 64, 2
    assert kv.macs(L) == [L * d * (H * (2 * rep + 2) + 2 * L * rep)] * 2
    plan = {"lm.model.layers:layers": [0], "lm.model.layers.2.self_attn:kv_groups": [1],
            "lm.model.layers.1.mlp:channels": list(range(10)), "lm:hidden": [3, 4]}
    expected = D.decoder_macs(wrapper, L, plan)
    # per-structure costs are marginal: a kv group and 2 hidden channels share their q/k/v columns and o_proj rows
    both = {"lm.model.layers.2.self_attn:kv_groups": [1], "lm:hidden": [3, 4]}
    marginal = kv.macs(L)[0] + 2 * D.site_of(wrapper, "lm:hidden").macs(L)[0]
    assert D.decoder_macs(wrapper, L, both) - (D.decoder_macs(wrapper, L) - marginal) == L * 2 * d * (2 * rep + 2)
    assert D.remove_plan(wrapper, plan) == 1 + 1 + 10 + 2
    assert [(w["kv_heads"], w["intermediate"]) for w in D.layer_widths(wrapper)] == [(2, 118), (1, 128)]
    assert D.decoder_macs(wrapper, L) == expected == counted(wrapper.lm, L)
    gpt2 = tiny("gpt2", attn_implementation="eager")
    D.remove_kv_groups(gpt2, 1, [0])
    D.remove_mlp_channels(gpt2, 2, [1, 2])
    assert D.decoder_macs(gpt2, L) == counted(gpt2, L)


def test_per_layer_widths_do_not_reload_and_say_so():
    model = tiny("llama")
    D.remove_mlp_channels(model, 0, [1, 2])
    with pytest.raises(RecipeError, match=r"MLP width per layer \[126, 128, 128\].*prune.decoder.uniform: true"):
        D.config_after(model)
    assert model.config.intermediate_size == 128  # the config keeps what the other layers have
    gpt2 = tiny("gpt2")
    for i in range(3):
        D.remove_kv_groups(gpt2, i, [0])
    with pytest.raises(RecipeError, match=r"n_embd / n_head"):
        D.config_after(gpt2)
    scaled = tiny("gpt2", scale_attn_by_inverse_layer_idx=True)
    D.remove_layers(scaled, [0])  # in memory each layer keeps its scaling; from its new index the config gives another
    with pytest.raises(RecipeError, match=r"gives layer 0's attention scaling = 0.25, the pruned model has 0.125"):
        D.config_after(scaled)
    scaled = tiny("gpt2", scale_attn_by_inverse_layer_idx=True)
    D.remove_layers(scaled, [2])  # the last layer: the others keep their index and scaling
    assert D.config_after(scaled).n_layer == 2


RELOAD = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    ids = torch.tensor(json.loads(sys.argv[1]))
    out = {}
    for path in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            out[path] = model(ids).logits.tolist()
    assert not any(name.split(".")[0] == "compressor" for name in sys.modules)
    print(json.dumps(out))
""")


def _prune_uniformly(model, family: str) -> None:
    """One layer, then per layer one key/value group and 16 MLP channels, then 8 hidden channels (GPT-2: layers and
    MLP width, what its config can express)."""
    D.remove_layers(model, [1])
    count = len(D.decoder_layers(model))
    for i in range(count):
        if family != "gpt2":
            D.remove_kv_groups(model, i, [i % 2])
        D.remove_mlp_channels(model, i, range(i, 128, 8))
    if family != "gpt2":
        D.remove_hidden_channels(model, range(0, 64, 8))


def test_uniformly_pruned_models_reload_with_from_pretrained_without_compressor(tmp_path):
    models = {"llama": tiny("llama"),
              "qwen2": tiny("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1),
              "qwen3": tiny("qwen3", tie_word_embeddings=True), "phi3": tiny("phi3"), "gpt2": tiny("gpt2")}
    expected = {}
    for family, model in models.items():
        _prune_uniformly(model, family)
        config = D.config_after(model)
        if family == "gpt2":
            assert (config.n_layer, config.n_inner) == (2, 112)
        else:
            assert (config.num_hidden_layers, config.num_key_value_heads, config.num_attention_heads,
                    config.intermediate_size, config.hidden_size, config.head_dim) == (2, 1, 2, 112, 56, 16)
        if family == "qwen3":
            assert model.lm_head.weight is model.model.embed_tokens.weight
        path = tmp_path / family
        model.save_pretrained(path)
        expected[str(path)] = logits(model)
    result = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(IDS.tolist()), *expected], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    for path, want in expected.items():
        got = torch.tensor(reloaded[path])
        assert got.shape == want.shape and (got - want).abs().max() < 1e-5, path
