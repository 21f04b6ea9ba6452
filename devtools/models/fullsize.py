"""SDXL and FLUX.1-dev full-size architectures with random weights, built from their published
configs: no download. SD 1.5's is in sd15.py.

For GPU benchmarks (`scripts/bench.py --gpu`), where speed depends on shapes, not on trained weights.
The builders initialise on the device and dtype they are given: FLUX.1-dev has 12 billion parameters.
"""

from pathlib import Path

import torch
from diffusers import (
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

from devtools.models.sd15 import build_sd15_random_pipeline, clip_config, clip_l, initialised_on, sd_vae
from devtools.models.tiny import build_t5_tokenizer, build_tokenizer, sd_scheduler_config

T5_VOCAB_SIZE = 32128


def sdxl_components(tokenizer: CLIPTokenizer) -> dict:
    unet = UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(
        tokenizer, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        hidden_act="gelu", projection_dim=1280,
    ))
    return {
        "unet": unet,
        "vae": sd_vae(sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        "text_encoder": clip_l(tokenizer),
        "text_encoder_2": text_encoder_2,
    }


def flux_dev_components(tokenizer: CLIPTokenizer) -> dict:
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    t5 = T5EncoderModel(T5Config(
        vocab_size=T5_VOCAB_SIZE, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
    ))
    vae = sd_vae(latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False)
    return {"transformer": transformer, "text_encoder_2": t5, "vae": vae, "text_encoder": clip_l(tokenizer)}


def build_sdxl_random_pipeline(workdir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    tokenizer = build_tokenizer(workdir / "tokenizer-src")
    with initialised_on(device, dtype):
        models = sdxl_components(tokenizer)
    scheduler = EulerDiscreteScheduler(**sd_scheduler_config(), timestep_spacing="leading")
    return StableDiffusionXLPipeline(**models, tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler)


def build_flux_dev_random_pipeline(workdir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    tokenizer = build_tokenizer(workdir / "tokenizer-src")
    with initialised_on(device, dtype):
        models = flux_dev_components(tokenizer)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(**models, tokenizer=tokenizer, tokenizer_2=build_t5_tokenizer(), scheduler=scheduler)


BUILDERS = {"sd15": build_sd15_random_pipeline, "sdxl": build_sdxl_random_pipeline, "flux": build_flux_dev_random_pipeline}
