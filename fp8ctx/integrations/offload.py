"""accelerate's offloading, as it shows to fp8ctx: weights on the meta device with hooks that fill them."""

from __future__ import annotations

from torch import nn

__all__ = ["meta_weight_advice"]


def meta_weight_advice(module: nn.Module) -> str:
    """What to do about a weight of ``module`` that is on the meta device (no values to quantize).

    accelerate's ``cpu_offload``, ``enable_sequential_cpu_offload`` and offloading ``device_map``s leave
    weights on meta and install ``_hf_hook``s that swap dense weights in at every forward; those cannot be
    held as FP8. Any other meta weight is simply not loaded yet.
    """
    if any(hasattr(m, "_hf_hook") for m in module.modules()):
        return (
            "The model is offloaded by accelerate (cpu_offload / enable_sequential_cpu_offload / a device_map "
            "with offload), which swaps dense weights in at every forward; fp8ctx cannot hold those as FP8. "
            "Load the model onto its devices, or use enable_model_cpu_offload(), which fp8ctx supports."
        )
    return "Load the weights first, e.g. with from_pretrained(...) or load_state_dict(..., assign=True)."
