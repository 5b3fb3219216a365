"""Token-id inputs of text models (model.inputs: tokens), shared by the torch side and the torch-free bench.

Traces, MAC counts, exports and timings need an input of the right shape, not meaningful text: their token ids are
drawn from [0, TOKEN_ID_RANGE), below the vocabulary size of every real tokenizer (BERT's 30522, RoBERTa's 50265),
so any text model can embed them. Parity checks run on real tokenized validation text instead.
"""
from __future__ import annotations

TOKEN_ID_RANGE = 100
