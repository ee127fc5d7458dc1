"""The model wing: a Llama-family model's math, knowing nothing of pipelines or meshes.

`config.py` (the architecture as a frozen dataclass), `params.py` (the parameter tree and
where each leaf comes from in a Hugging Face checkpoint), `llama.py` (embedding, blocks over
a stacked layer axis, logits, the KV cache), `rope.py`, `quant.py` (8-bit weights),
`decode_attention.py` and `int8_matmul.py` (Pallas kernels), `sampling.py` (the last
stage's token choice) and `decode_state.py` (when a row stops). Everything above builds on
these; nothing here imports another wing.
"""
