"""Pipelines and models that move: a full diffusers QwenImagePipeline call, `fp8_weights(pipe)`, `.to()`
inside the block, accelerate offload and device maps (the GPU cases run where CUDA is present)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_restored, fake_quantized_copy, relative_error, snapshot
from torch import nn

import _models
from fp8ctx import FP8Error, FP8Store, FP8Tensor, fp8_weights

pytest.importorskip("diffusers")
accelerate = pytest.importorskip("accelerate")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def reference_pipeline(pipe, components=("vae", "text_encoder"), granularity="channel"):
    twin = copy.copy(pipe)
    for name in components:
        twin.register_modules(**{name: fake_quantized_copy(getattr(pipe, name), granularity)})
    return twin


@pytest.fixture(scope="module")
def pipe():
    pipeline = _models.qwen_image_pipeline()
    _models.run_qwen_image_pipeline(pipeline)  # first call: diffusers VAEs create their feature caches
    return pipeline


def test_full_qwen_image_pipeline_call_inside_the_context(pipe):
    plain = _models.run_qwen_image_pipeline(pipe)
    expected = _models.run_qwen_image_pipeline(reference_pipeline(pipe))
    before = {name: snapshot(getattr(pipe, name)) for name in ("vae", "text_encoder", "transformer")}
    with fp8_weights(pipe.vae, pipe.text_encoder) as (vae_store, encoder_store):
        assert pipe.vae.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
        assert pipe._execution_device.type == "cpu"
        image = _models.run_qwen_image_pipeline(pipe)
    for name, snap in before.items():
        assert_restored(getattr(pipe, name), snap)
    assert len(vae_store) > 0 and len(encoder_store) > 0
    assert image.shape == plain.shape and torch.isfinite(image).all()
    torch.testing.assert_close(image, expected, rtol=2e-2, atol=2e-2)
    assert relative_error(image, expected) < 1e-2
    assert relative_error(image, plain) > 1e-4, "nothing was quantized"


def test_a_pipeline_argument_targets_vae_and_text_encoder_by_default(pipe):
    before = snapshot(pipe.transformer)
    with fp8_weights(pipe) as stores:
        assert set(stores) == {"vae", "text_encoder"}
        assert isinstance(pipe.vae.decoder.conv_in._parameters["weight"], FP8Tensor)
        assert not any(isinstance(p, FP8Tensor) for p in pipe.transformer.parameters())
        _models.run_qwen_image_pipeline(pipe)
    assert_restored(pipe.transformer, before)
    with fp8_weights(pipe, components=["transformer"]) as stores:
        assert set(stores) == {"transformer"}
        image = _models.run_qwen_image_pipeline(pipe)
    expected = _models.run_qwen_image_pipeline(reference_pipeline(pipe, ["transformer"]))
    torch.testing.assert_close(image, expected, rtol=2e-2, atol=2e-2)
    with pytest.raises(FP8Error, match="unet"):
        fp8_weights(pipe, components=["unet"])


def test_vae_tiling_inside_the_pipeline_context(pipe):
    vae = _models.enable_small_tiling(copy.deepcopy(pipe.vae))
    image, _ = _models.qwen_image_vae_inputs(vae, size=48)
    reference = fake_quantized_copy(vae, "channel")
    with torch.no_grad():
        expected = reference.decode(reference.encode(image).latent_dist.mode()).sample
        with fp8_weights(vae, granularity="channel"):
            out = vae.decode(vae.encode(image).latent_dist.mode()).sample
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("target", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_module_to_dtype_inside_keeps_fp8_and_converts_the_originals_on_exit(target):
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).to(torch.bfloat16)
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    objects = {name: p for name, p in model.named_parameters()}
    x = torch.randn(3, 8)
    with fp8_weights(model, granularity="channel") as store:
        expected = model(x.to(torch.bfloat16)).to(target)
        model.to(target)
        held = model[0]._parameters["weight"]
        assert isinstance(held, FP8Tensor) and held.qdata.dtype == torch.float8_e4m3fn and held.dtype == target
        out = model(x.to(target))
        dense = store["0.weight"].dequantize()
    assert dense.dtype == target
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    for name, p in model.named_parameters():
        assert p is objects[name] and p.dtype == target
        assert torch.equal(p, originals[name].to(target))  # what module.to() does to the original values


def test_channels_last_and_gradients_follow_a_conversion_made_inside():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    model(torch.randn(1, 3, 8, 8)).sum().backward()  # the parameters carry gradients into the block
    objects = {name: p for name, p in model.named_parameters()}
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad(), fp8_weights(model, granularity="channel") as store:
        expected = model(x)
        model.to(memory_format=torch.channels_last).double()
        assert store["0.weight"].qdata.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x.double().to(memory_format=torch.channels_last)).float(), expected)
    for name, p in model.named_parameters():
        assert p is objects[name] and p.dtype == torch.float64 and torch.equal(p, originals[name].double())
        assert p.grad is not None and p.grad.dtype == torch.float64  # as module.double() does outside a block
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last)


def test_accelerate_offloaded_model_is_refused_clearly():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    before = snapshot(model)
    with pytest.raises(FP8Error, match="accelerate"):
        with fp8_weights(model):
            pass
    assert_restored(model, before)


def _tower_and_twin():
    model = _models.qwen25vl_text_tower()
    return model, copy.deepcopy(model)


def _hooks(model):
    return {name: vars(m).get("_hf_hook") for name, m in model.named_modules()}


def _fp8_run_on_one_device(twin, ids, **options):
    """The single-device FP8 run a dispatched model must reproduce: the same weights, not dispatched."""
    with torch.no_grad(), fp8_weights(twin, **options):
        return twin(input_ids=ids).last_hidden_state


def test_accelerate_hooked_device_map_holds_each_layer_on_its_device_and_keeps_the_hooks():
    model, twin = _tower_and_twin()
    ids = torch.randint(0, _models.QWEN25VL_VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = _fp8_run_on_one_device(twin, ids, granularity="channel")
    # force_hooks: one AlignDevicesHook per block even on one device, as a real multi-device map has
    accelerate.dispatch_model(model, _models.text_tower_device_map(model, ["cpu", "cpu"]), main_device="cpu",
                              force_hooks=True)
    hooks, before = _hooks(model), snapshot(model)
    assert sum(hook is not None for hook in hooks.values()) >= 4
    with torch.no_grad(), fp8_weights(model, granularity="channel") as store:
        for name, entry in store.items():
            param = dict(before_params := {n: p for n, p in twin.named_parameters()})[name]
            assert entry.qdata.device == param.device and entry.scale.device == param.device
            assert isinstance(model.get_parameter(name), FP8Tensor)
        out = model(input_ids=ids).last_hidden_state
        assert _hooks(model) == hooks
    assert_restored(model, before)
    assert _hooks(model) == hooks  # the same hook objects, still installed (forward overrides: assert_restored)
    assert torch.equal(out, expected)  # one device: bit for bit
    assert relative_error(out, twin(input_ids=ids).last_hidden_state) > 1e-4, "nothing was quantized"


@pytest.mark.parametrize("with_store", [False, True], ids=["quantize", "store"])
def test_accelerate_disk_offloaded_layers_are_refused_by_name_and_can_be_left_out(tmp_path, with_store):
    model, twin = _tower_and_twin()
    ids = torch.randint(0, _models.QWEN25VL_VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(1))
    # layer 1 and the norm go to disk: accelerate loads them into the module at every forward
    accelerate.dispatch_model(model, _models.text_tower_device_map(model, ["cpu", "disk"]), main_device="cpu",
                              offload_dir=str(tmp_path))
    hooks, before = _hooks(model), snapshot(model)
    store = FP8Store.from_module(twin) if with_store else None
    with pytest.raises(FP8Error, match=r"offloaded by accelerate.*'layers\.1'.*exclude="):
        with fp8_weights(model, store=store):
            pass
    assert_restored(model, before)
    # the resident layers held as FP8, the offloaded ones left to accelerate
    store = FP8Store.from_module(twin, exclude=["layers.1"]) if with_store else None
    options = {"store": store} if with_store else {"exclude": ["layers.1"]}
    # accelerate gives an offloaded layer new meta Parameter objects at every forward, with or without fp8ctx:
    # exactness is checked on what fp8ctx holds (the resident part) and the hooks
    resident = [model.embed_tokens, model.layers[0], model.rotary_emb]
    resident_before = [snapshot(part) for part in resident]
    with torch.no_grad(), fp8_weights(model, **options) as held:
        assert "layers.0.mlp.down_proj.weight" in held and not any(name.startswith("layers.1.") for name in held)
        out = model(input_ids=ids).last_hidden_state
    for part, snap in zip(resident, resident_before):
        assert_restored(part, snap)
    assert all(p.is_meta for p in model.layers[1].parameters()) and _hooks(model) == hooks
    assert torch.equal(out, _fp8_run_on_one_device(twin, ids, exclude=["layers.1"]))


def test_transformers_from_pretrained_device_map_holds_the_resident_layers(tmp_path):
    from transformers import Qwen2_5_VLTextModel

    model = _models.qwen25vl_text_tower()
    model.save_pretrained(tmp_path / "model")
    device_map = _models.text_tower_device_map(model, ["cpu", "disk"])
    loaded = Qwen2_5_VLTextModel.from_pretrained(tmp_path / "model", device_map=device_map, dtype=torch.bfloat16,
                                                 offload_folder=str(tmp_path / "offload"))
    ids = torch.randint(0, _models.QWEN25VL_VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(3))
    with pytest.raises(FP8Error, match=r"offloaded by accelerate \('layers\.1', 'norm'"):
        with fp8_weights(loaded):
            pass
    resident = snapshot(loaded.layers[0])
    with torch.no_grad(), fp8_weights(loaded, exclude=["layers.1"]) as held:
        assert isinstance(loaded.layers[0].mlp.up_proj._parameters["weight"], FP8Tensor) and len(held) == 7
        out = loaded(input_ids=ids).last_hidden_state
    assert_restored(loaded.layers[0], resident)
    assert torch.equal(out, _fp8_run_on_one_device(model, ids, exclude=["layers.1"]))


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@two_gpus
def test_accelerate_device_map_over_two_gpus():
    model, twin = _tower_and_twin()
    ids = torch.randint(0, _models.QWEN25VL_VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(2))
    expected = _fp8_run_on_one_device(twin.to("cuda:0"), ids.cuda(0), granularity="channel")
    device_map = _models.text_tower_device_map(model, [0, 1])
    accelerate.dispatch_model(model, device_map)
    hooks, before = _hooks(model), snapshot(model)
    with torch.no_grad(), fp8_weights(model, granularity="channel") as store:
        devices = {name: model.get_parameter(name).device for name in store}
        assert {device.index for device in devices.values()} == {0, 1}
        for name, entry in store.items():
            assert entry.qdata.device == devices[name] and entry.scale.device == devices[name]
        out = model(input_ids=ids.cuda(0)).last_hidden_state
    assert_restored(model, before)
    assert _hooks(model) == hooks
    torch.testing.assert_close(out.to(expected.device), expected, rtol=1.6e-2, atol=1e-2)  # bf16 rounding


@cuda
def test_to_cuda_and_back_inside_moves_fp8_not_dense_copies():
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)]).to(torch.bfloat16)
    objects = [p for p in model.parameters()]
    originals = [p.detach().clone() for p in objects]
    x = torch.randn(2, 512, dtype=torch.bfloat16)
    with fp8_weights(model) as store:
        expected = model(x)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        model.to("cuda")
        on_gpu = torch.cuda.memory_allocated() - base
        assert store["0.weight"].qdata.is_cuda
        out = model(x.cuda())
        dense_bytes = sum(p.numel() * 2 for p in objects if p.dim() == 2)
        assert on_gpu < dense_bytes * 0.6  # FP8 codes + biases, no bf16 copies
    torch.testing.assert_close(out.cpu(), expected, rtol=2e-2, atol=2e-2)
    for p, original in zip(model.parameters(), originals):
        assert p.is_cuda and torch.equal(p.cpu(), original)
    assert [id(p) for p in model.parameters()] == [id(p) for p in objects]


@cuda
def test_diffusers_model_cpu_offload_pipeline():
    pipe = _models.qwen_image_pipeline()
    plain = _models.run_qwen_image_pipeline(pipe)
    pipe.enable_model_cpu_offload()
    expected = _models.run_qwen_image_pipeline(reference_pipeline(pipe))
    with fp8_weights(pipe):
        image = _models.run_qwen_image_pipeline(pipe)
    torch.testing.assert_close(image.cpu().float(), expected.cpu().float(), rtol=2e-2, atol=2e-2)
    assert relative_error(image, plain.to(image.device)) > 1e-4
    again = _models.run_qwen_image_pipeline(pipe)
    torch.testing.assert_close(again.cpu(), plain.cpu(), rtol=1e-2, atol=1e-2)


def _stack():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)).to(torch.bfloat16)


@cuda
def test_accelerate_device_map_across_cpu_and_gpu():
    from accelerate import dispatch_model

    model = _stack()
    reference = fake_quantized_copy(model, "channel")
    # main_device="cpu": the CPU layers stay resident (no offload); accelerate's hooks move activations
    model = dispatch_model(model, device_map={"0": 0, "1": 0, "2": "cpu", "3": "cpu", "4": 0}, main_device="cpu")
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    before = snapshot(model)
    with fp8_weights(model, granularity="channel") as store:
        assert store["0.weight"].qdata.is_cuda and not store["2.weight"].qdata.is_cuda
        assert store["4.weight"].qdata.is_cuda
        out = model(x)
    assert_restored(model, before)
    assert relative_error(out.cpu(), reference(x)) < 1e-2


@cuda
def test_accelerate_device_map_with_offloaded_layers_is_refused_clearly():
    from accelerate import dispatch_model

    # with a GPU main device, accelerate offloads the "cpu" entries: their weights live on meta
    model = dispatch_model(_stack(), device_map={"0": 0, "1": 0, "2": "cpu", "3": "cpu", "4": 0})
    before = snapshot(model)
    with pytest.raises(FP8Error, match="offloaded by accelerate"):
        with fp8_weights(model):
            pass
    assert_restored(model, before)


def test_the_main_tensor_of_diffusers_and_transformers_outputs():
    from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
    from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

    from fp8ctx.integrations.outputs import first_tensor

    sample, hidden, logits = torch.randn(1, 3, 4, 4), torch.randn(2, 5, 8), torch.randn(2, 5, 11)
    assert first_tensor(DecoderOutput(sample=sample)) is sample
    assert first_tensor(BaseModelOutput(last_hidden_state=hidden)) is hidden
    assert first_tensor(CausalLMOutput(logits=logits)) is logits
    moments = torch.randn(1, 8, 2, 2)
    assert torch.equal(first_tensor({"latent_dist": DiagonalGaussianDistribution(moments)}), moments[:, :4])  # mode
    assert first_tensor((None, hidden)) is hidden
    with pytest.raises(TypeError, match="pass run="):
        first_tensor({"text": "no tensor"})


def test_a_pipeline_is_recognised_by_its_components_and_asked_for_known_ones():
    from fp8ctx.integrations.pipelines import DEFAULT_COMPONENTS, is_pipeline, pipeline_modules

    class Pipe:
        def __init__(self) -> None:
            self.components = {"vae": nn.Linear(2, 2), "text_encoder": nn.Linear(2, 2), "tokenizer": object()}

    pipe = Pipe()
    assert is_pipeline(pipe) and not is_pipeline(nn.Linear(2, 2)) and not is_pipeline(object())
    assert list(pipeline_modules(pipe, None)) == list(DEFAULT_COMPONENTS)
    with pytest.raises(FP8Error, match=r"no module component\(s\) \['tokenizer'\].*\['text_encoder', 'vae'\]"):
        pipeline_modules(pipe, ["tokenizer"])


def test_a_pipeline_without_a_default_component_holds_the_ones_it_has():
    class Pipe:
        def __init__(self) -> None:
            self.vae = nn.Sequential(nn.Linear(2, 2))
            self.components = {"vae": self.vae, "text_encoder": None, "transformer": nn.Linear(2, 2)}

    pipe = Pipe()
    with fp8_weights(pipe) as stores:  # text_encoder is None: the vae alone, no error
        assert list(stores) == ["vae"] and isinstance(pipe.vae[0].weight, FP8Tensor)
    with fp8_weights(pipe, components="transformer") as stores:  # one name, not the letters t, r, a, ...
        assert list(stores) == ["transformer"]
    with pytest.raises(FP8Error, match=r"\['text_encoder'\] set to None.*\['transformer', 'vae'\]"):
        fp8_weights(pipe, components=["vae", "text_encoder"])
    with pytest.raises(FP8Error, match=r"no module component\(s\) \['unet'\].*\['transformer', 'vae'\]"):
        fp8_weights(pipe, components="unet")
    pipe.components["vae"] = None
    with pytest.raises(FP8Error, match=r"none of the default components.*\['transformer'\]"):
        fp8_weights(pipe)
