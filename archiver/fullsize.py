"""Full-size architectures with random weights, built from their published configs: no download.

For GPU benchmarks (`scripts/bench.py --gpu`), where speed depends on shapes, not on trained weights.
Build them under `torch.device("cuda")` (and a half-precision default dtype) to initialise on the GPU:
FLUX.1-dev has 12 billion parameters.
"""

from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

from archiver.tiny import assemble_sd_pipeline, build_t5_tokenizer, build_tokenizer, sd_scheduler_config

CLIP_VOCAB_SIZE = 49408  # CLIP's embedding size; our offline character-level tokenizer uses its first ids
T5_VOCAB_SIZE = 32128


def clip_l(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """CLIP ViT-L/14's text encoder: SD 1.5's, and the first of SDXL's and FLUX's."""
    return CLIPTextModel(clip_config(tokenizer, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, hidden_act="quick_gelu"))


def clip_config(tokenizer: CLIPTokenizer, **sizes) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes,
    )


def sd_vae(**overrides) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        **{"latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215, **overrides},
    )


def sd15_components(tokenizer: CLIPTokenizer) -> dict:
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    return {"unet": unet, "vae": sd_vae(), "text_encoder": clip_l(tokenizer)}


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


@contextmanager
def initialised_on(device: str | torch.device, dtype: torch.dtype):
    """Create parameters directly on `device` in `dtype`: no float32 copy in host memory first."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_sd15_random_pipeline(workdir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    tokenizer = build_tokenizer(workdir / "tokenizer-src")
    with initialised_on(device, dtype):
        models = sd15_components(tokenizer)
    scheduler = PNDMScheduler(**sd_scheduler_config(), skip_prk_steps=True)
    return assemble_sd_pipeline(**models, tokenizer=tokenizer, scheduler=scheduler)


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
