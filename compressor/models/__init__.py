"""Models in and out: model references (torchvision:, timm:, zoo:, python:, files), safe checkpoint loading, the
small-image zoo, and the slim format (slim.json + weights.safetensors) that reloads a pruned model without pickle."""
