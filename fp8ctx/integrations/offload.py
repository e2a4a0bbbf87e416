"""accelerate's device maps, as they show to fp8ctx: resident layers, and offloaded ones that cannot be held.

A model dispatched by accelerate (``dispatch_model``, ``from_pretrained(device_map=...)``) carries an
``AlignDevicesHook`` in each placed module's ``_hf_hook``. Resident layers keep their weights on their own
device, and the hooks only move activations: fp8ctx holds those weights as FP8 on that same device and
leaves the hooks alone. Offloaded layers (``offload=True``: ``cpu_offload``, ``enable_sequential_cpu_offload``,
the ``"cpu"``/``"disk"`` entries of a map whose main device is a GPU) keep their weights on the meta device and
have the hook write dense copies from its own ``weights_map`` into the module at every forward, then meta
again: a stand-in put there would be overwritten by the first forward, so those layers cannot be held.

Read by duck typing (``_hf_hook``, ``offload``, a ``SequentialHook``'s ``hooks``): accelerate is not imported.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["meta_weight_advice", "offloaded_by_accelerate", "under"]


def _offloads(hook: Any) -> bool:
    if hook is None:
        return False
    if bool(getattr(hook, "offload", False)):
        return True
    return any(_offloads(inner) for inner in getattr(hook, "hooks", ()) or ())


def offloaded_by_accelerate(module: nn.Module) -> list[str]:
    """The outermost submodules of ``module`` (``""`` for itself) whose weights accelerate offloads.

    accelerate hooks each offloaded leaf; a parent all of whose weight-bearing parts are offloaded is
    named instead of its leaves (``'layers.1'``, not its ten projections), which is what ``exclude=`` takes.

    Example:
        >>> offloaded_by_accelerate(torch.nn.Linear(2, 2))
        []
    """
    state: dict[str, str] = {}  # "offloaded" | "resident" | "neutral" (nothing to hold), per module name
    modules = list(module.named_modules())
    for name, sub in reversed(modules):  # children before parents
        if _offloads(getattr(sub, "_hf_hook", None)):
            state[name] = "offloaded"
            continue
        prefix = f"{name}." if name else ""
        children = [state[prefix + child] for child, _ in sub.named_children()]
        if any(True for _ in sub.parameters(recurse=False)) or "resident" in children:
            state[name] = "resident"
        else:
            state[name] = "offloaded" if "offloaded" in children else "neutral"
    outermost: list[str] = []
    for name, _ in modules:
        if state[name] == "offloaded" and under(name, outermost) is None:
            outermost.append(name)
    return outermost


def under(name: str, parents: Iterable[str]) -> str | None:
    """The first of ``parents`` that is ``name``'s module or one of its ancestors (``""`` is the root)."""
    for parent in parents:
        if parent == "" or name == parent or name.startswith(parent + "."):
            return parent
    return None


def meta_weight_advice(module: nn.Module) -> str:
    """What to do about a weight of ``module`` that is on the meta device (no values to quantize).

    With accelerate's offloading, names the offloaded layers and the ways out; any other meta weight is
    simply not loaded yet.
    """
    offloaded = offloaded_by_accelerate(module)
    if offloaded or any(hasattr(m, "_hf_hook") for m in module.modules()):
        named = ", ".join(repr(name or "<root>") for name in offloaded[:4]) or "some layers"
        more = f" (and {len(offloaded) - 4} more)" if len(offloaded) > 4 else ""
        return (
            f"The model is offloaded by accelerate ({named}{more}: cpu_offload / enable_sequential_cpu_offload / a "
            "device_map with offload), whose hooks swap dense weights in at every forward; fp8ctx cannot hold "
            "those as FP8. Leave the offloaded layers out with exclude=[...] to hold the resident ones, load the "
            "model onto its devices, or use enable_model_cpu_offload(), which fp8ctx supports."
        )
    return (
        "Load the weights first, e.g. with from_pretrained(...) or load_state_dict(..., assign=True); or run the "
        "skeleton from a complete store: fp8_weights(skeleton, store=FP8Store.from_checkpoint(skeleton, path))"
    )
