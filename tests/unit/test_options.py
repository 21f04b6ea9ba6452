"""Each memory and speed option of the handler section takes effect on the loaded pipeline."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import SlicedAttnProcessor
from torch._dynamo.utils import counters

from devtools import REPO_ROOT
from handlers.core.config import HandlerConfig
from handlers.core.pipelines import apply_memory_options, compile_denoiser, load_pipeline
from tests.unit.helpers import pixels, serve, served_family


def generates(served) -> bool:
    [answer] = served.post({"prompt": "a cat", "output_format": "png"})
    return answer.status == 200 and answer.body.startswith(b"\x89PNG")


def test_no_option_leaves_the_pipeline_as_loaded(tiny_pipeline_dir):
    served = serve(tiny_pipeline_dir)
    processors = served.service.pipeline.unet.attn_processors.values()
    assert not any(isinstance(processor, SlicedAttnProcessor) for processor in processors)
    assert not served.service.pipeline.vae.use_slicing and not served.service.pipeline.vae.use_tiling
    assert getattr(served.service.pipeline.unet, "_hf_hook", None) is None
    assert generates(served)


def test_attention_slicing(tiny_pipeline_dir):
    served = serve(tiny_pipeline_dir, attention_slicing="max")
    processors = [p for p in served.service.pipeline.unet.attn_processors.values() if isinstance(p, SlicedAttnProcessor)]
    assert processors and all(processor.slice_size == 1 for processor in processors)
    assert generates(served)


@pytest.mark.parametrize("option, flag", [("vae_slicing", "use_slicing"), ("vae_tiling", "use_tiling")])
def test_vae_slicing_and_tiling(tiny_pipeline_dir, option, flag):
    served = serve(tiny_pipeline_dir, **{option: True})
    assert getattr(served.service.pipeline.vae, flag)
    assert generates(served)


def test_channels_last(tiny_pipeline_dir):
    served = serve(tiny_pipeline_dir, channels_last=True)
    convolution = served.service.pipeline.unet.conv_in.weight
    assert convolution.is_contiguous(memory_format=torch.channels_last) and not convolution.is_contiguous()
    assert served.service.pipeline.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert generates(served)


def test_fused_qkv_projections_fuse_the_unet_and_keep_the_image(tiny_pipeline_dir):
    """(The tiny VAE has no attention to fuse.)"""
    body = {"prompt": "a cat", "output_format": "png", "seed": 3}
    served = serve(tiny_pipeline_dir, fuse_qkv_projections=True)
    processors = served.service.pipeline.unet.attn_processors.values()
    assert {type(processor).__name__ for processor in processors} == {"FusedAttnProcessor2_0"}
    [fused] = served.post(body)
    [unfused] = serve(tiny_pipeline_dir).post(body)
    assert np.abs(pixels(fused) - pixels(unfused)).max() <= 2  # one matmul instead of three: rounding only


def test_attention_backend_reaches_a_dispatching_transformer(family_archives):
    served = served_family(family_archives["flux"], attention_backend="_native_math")
    backends = {
        getattr(module.processor, "_attention_backend", None)
        for module in served.service.pipeline.transformer.modules() if hasattr(module, "processor")
    }
    assert {getattr(backend, "value", backend) for backend in backends} == {"_native_math"}
    assert generates(served)


def test_attention_backend_on_a_unet_is_refused_with_the_reason(tiny_pipeline_dir):
    with pytest.raises(ValueError, match="always runs PyTorch's SDPA"):
        serve(tiny_pipeline_dir, attention_backend="_native_flash")


def test_a_hub_attention_backend_is_not_allowed():
    with pytest.raises(ValueError, match="attention_backend"):
        HandlerConfig(attention_backend="flash_hub")


def test_model_cpu_offload_installs_cuda_hooks_and_leaves_the_weights_on_the_cpu(tiny_pipeline_dir):
    """Installing the hooks needs no GPU; running them does (the CUDA test below)."""
    pipeline = load_pipeline(tiny_pipeline_dir, torch.float32)
    apply_memory_options(pipeline, HandlerConfig(cpu_offload="model"), torch.device("cuda:0"))
    hook = pipeline.unet._hf_hook
    assert type(hook).__name__ == "CpuOffload" and hook.execution_device == torch.device("cuda:0")
    assert pipeline.unet.conv_in.weight.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="running model offload's hooks needs CUDA; no GPU here")
def test_model_cpu_offload_runs_each_model_on_the_gpu_and_puts_it_back(tiny_pipeline_dir):
    served = serve(tiny_pipeline_dir, gpu_id=0, cpu_offload="model")
    seen = []
    hook = served.service.pipeline.unet.register_forward_pre_hook(lambda module, args: seen.append(module.conv_in.weight.device.type))
    try:
        assert generates(served)
    finally:
        hook.remove()
    assert set(seen) == {"cuda"}
    assert served.service.pipeline.unet.conv_in.weight.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sequential offload installs CUDA-only hooks; no GPU here")
def test_sequential_cpu_offload_moves_layers_as_they_run(tiny_pipeline_dir):
    served = serve(tiny_pipeline_dir, gpu_id=0, cpu_offload="sequential")
    assert type(served.service.pipeline.unet._hf_hook).__name__ == "AlignDevicesHook"
    assert generates(served)


def test_a_worker_warms_up_in_initialize_unless_told_not_to(tiny_pipeline_dir, caplog):
    with caplog.at_level("INFO", logger="handlers.core.service"):
        served = serve(tiny_pipeline_dir)
    assert "warm-up generation took" in caplog.text
    assert generates(served)
    caplog.clear()
    with caplog.at_level("INFO", logger="handlers.core.service"):
        serve(tiny_pipeline_dir, warm_up=False)
    assert "warm-up generation took" not in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA worker's warm-up needs a GPU; none here")
def test_an_eager_cuda_worker_warms_up_so_the_first_request_is_not_slow(tiny_pipeline_dir, caplog):
    with caplog.at_level("INFO", logger="handlers.core.service"):
        served = serve(tiny_pipeline_dir, gpu_id=0)
    assert "warm-up generation took" in caplog.text
    assert generates(served)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the refusal on a CPU-only worker")
def test_cpu_offload_on_a_cpu_worker_is_a_clear_error(tiny_pipeline_dir):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        serve(tiny_pipeline_dir, cpu_offload="model")


@pytest.mark.parametrize("name, dtype", [("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_torch_dtype(tiny_pipeline_dir, name, dtype):
    served = serve(tiny_pipeline_dir, torch_dtype=name)
    assert served.service.pipeline.unet.dtype == served.service.pipeline.vae.dtype == served.service.pipeline.text_encoder.dtype == dtype
    assert generates(served)


def test_default_scheduler_applies_unless_the_request_names_one(tiny_pipeline_dir):
    served = serve(tiny_pipeline_dir, scheduler="euler", output_format="json")
    [answer] = served.post({"prompt": "a cat"})
    assert json.loads(answer.body)["parameters"]["scheduler"] == "euler"
    [answer] = served.post({"prompt": "a cat", "scheduler": "ddim"})
    assert json.loads(answer.body)["parameters"]["scheduler"] == "ddim"
    view = served.service.generator.views.pipeline_for("txt2img", scheduler="euler")
    assert type(view.scheduler).__name__ == "EulerDiscreteScheduler"


def test_torch_compile_is_warmed_up_in_initialize(tiny_pipeline_dir):
    """Inductor compiles the tiny UNet (about 40 s on 2 cores) during initialize, not in the first request."""
    graphs_before = counters["stats"]["unique_graphs"]
    served = serve(tiny_pipeline_dir, torch_compile=True)
    assert served.service.pipeline.unet._compiled_call_impl is not None
    graphs_after_warm_up = counters["stats"]["unique_graphs"]
    assert graphs_after_warm_up > graphs_before
    assert generates(served)
    assert counters["stats"]["unique_graphs"] == graphs_after_warm_up  # the first request compiled nothing new


def test_an_unknown_option_is_refused_with_the_allowed_ones(tiny_pipeline_dir):
    with pytest.raises(ValueError, match="attention_slicing"):
        serve(tiny_pipeline_dir, attention_slicing="sometimes")


def test_options_reach_the_sdxl_refiner_too(family_archives):
    served = served_family(family_archives["sdxl"], vae_slicing=True, attention_slicing="auto")
    refiner = served.service.generator.refiner
    assert refiner.vae is served.service.pipeline.vae and refiner.vae.use_slicing
    assert any(isinstance(p, SlicedAttnProcessor) for p in refiner.unet.attn_processors.values())
    assert generates(served)


WORKER = """
import json, sys
from pathlib import Path
from handlers.core.pipelines import compile_counts
from tests.unit.helpers import serve
served = serve(Path(sys.argv[1]), torch_compile=True, compile_cache_dir=sys.argv[2])
compiled, loaded = compile_counts()
[answer] = served.post({"prompt": "a cat", "seed": 1})
print(json.dumps({"compiled": compiled, "loaded": loaded, "status": answer.status}))
"""


def start_compiled_worker(pipeline_dir, cache_dir) -> dict:
    """A new worker process, as TorchServe starts one on scale-up or after a crash."""
    result = subprocess.run([sys.executable, "-c", WORKER, str(pipeline_dir), str(cache_dir)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_new_compiled_worker_loads_the_graphs_instead_of_compiling(tiny_pipeline_dir, tmp_path):
    first = start_compiled_worker(tiny_pipeline_dir, tmp_path / "cache")
    second = start_compiled_worker(tiny_pipeline_dir, tmp_path / "cache")
    print(f"first worker: {first}; second worker: {second}")
    assert first["compiled"] > 0 and first["status"] == 200
    assert second == {"compiled": 0, "loaded": first["compiled"], "status": 200}
    # A cache that does not match (another torch, another device) or is damaged: compile again, and serve.
    for entry in (tmp_path / "cache").rglob("*"):
        if entry.is_file():
            entry.write_bytes(b"not what inductor wrote")
    damaged = start_compiled_worker(tiny_pipeline_dir, tmp_path / "cache")
    assert damaged["status"] == 200 and damaged["compiled"] > 0


def test_compile_regions_compiles_each_repeated_block_not_the_whole_denoiser(tiny_pipeline_dir):
    pipeline = load_pipeline(tiny_pipeline_dir, torch.float32)
    compile_denoiser(pipeline, HandlerConfig(torch_compile=True, compile_regions=True))
    blocks = [module for module in pipeline.unet.modules() if type(module).__name__ == "BasicTransformerBlock"]
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    assert pipeline.unet._compiled_call_impl is None
