"""The load wing: checkpoints onto devices.

`checkpoint.py` (Hugging Face config.json + safetensors, streamed leaf by leaf into their
placement; orbax save/restore), `params_cache.py` (placed, quantised params saved once and
restored on later runs), `weights.py` (the one call between a checked layout and its
weights) and `tokenizer.py` (tokenizer.json).
"""
