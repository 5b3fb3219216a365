"""Structured surgery on Hugging Face decoder language models (Llama, Mistral, Qwen2, Qwen3, Phi-3, GPT-2): whole
decoder layers, key/value groups of grouped-query attention, MLP channels and the hidden size, the planner's view of
them (sites.py), and whether the result reloads with from_pretrained (reload.py)."""
from compressor.models.decoder.arch import SUPPORTED_TEXT, arch_of
from compressor.models.decoder.reload import allowed_head_counts, check_head_ratio, config_after, config_problem
from compressor.models.decoder.sites import (KINDS, DecoderSite, decoder_macs, decoder_sites, is_decoder_root,
                                             remove_plan, site_of, widths_of)
from compressor.models.decoder.surgery import (LayerConfig, decoder_layers, layer_widths, remove_hidden_channels,
                                               remove_kv_groups, remove_layers, remove_mlp_channels, sync_config)

__all__ = ["KINDS", "SUPPORTED_TEXT", "DecoderSite", "LayerConfig", "allowed_head_counts", "arch_of",
           "check_head_ratio", "config_after", "config_problem", "decoder_layers", "decoder_macs", "decoder_sites",
           "is_decoder_root", "layer_widths", "remove_hidden_channels", "remove_kv_groups", "remove_layers",
           "remove_mlp_channels", "remove_plan", "site_of", "sync_config", "widths_of"]
