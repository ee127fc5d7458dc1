"""The plan wing: `python -m jaxpp.plan`, sizing before anything is allocated.

`presets.py` (model shapes and hardware), `inputs.py` (the workload asked about and the
fitted assumptions), `estimate.py` (memory per device and predicted rates for one `Layout`,
the same layout value the runtime runs) and `recommend.py` (every layout of the devices,
the best one and why). docs/planner.md gives the formulas and their validation.
"""
