"""The names of the mesh axes, declared once for the whole package.

`dp` (independent replicas), `pp` (pipeline stages), `tp` (tensor parallel inside a stage),
outermost first. They live below every wing because two of them name the axes: the
parallel wing builds meshes and programs over them, and the model's fused kernels split
their work over 'tp' when the surrounding mesh does; neither should import the other.
"""

DP, PP, TP = "dp", "pp", "tp"
AXES = (DP, PP, TP)
