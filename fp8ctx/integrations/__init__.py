"""What fp8ctx knows about other libraries, kept at the edge (each optional dependency imported lazily).

- ``pipelines``: diffusers pipelines as an argument (detection, which components to hold).
- ``offload``: why a weight sits on the meta device when accelerate offloads the model.
- ``outputs``: the main tensor of a diffusers / transformers model output.
- ``transformers_layers``: transformers' Conv1D and experts modules, as planning selects their weights.
- ``cli_models``: loading local model directories for ``python -m fp8ctx report``.
"""
