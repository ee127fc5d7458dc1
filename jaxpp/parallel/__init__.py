"""The parallel wing: how one model is spread over devices and run as a pipeline.

`layout.py` (the `Layout` value: names, rules, layer split), `mesh.py` (the dp x pp x tp
device mesh), `partition.py` (layers per chunk), `schedule.py` (schedules as tables, the
bubble), `shapes.py` (padded lengths, micro-batch cuts), `xla_options.py` (compiler options
per layout) and `pipeline.py` (the executor: one program per phase under `shard_map` over
'pp', the stage scan, the ppermute ring, a KV cache per stage). It uses the model wing's
math and knows nothing of requests, files or processes.
"""
