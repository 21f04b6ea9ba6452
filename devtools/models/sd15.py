"""Stable Diffusion 1.5's full-size architecture with random weights, built from its config: no download.

For GPU benchmarks (`scripts/bench.py --gpu`) and real-size tests, where speed and memory depend on
shapes, not on trained weights. Its CLIP text encoder and VAE are shared by SDXL and FLUX
(fullsize.py).
"""

from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from devtools.models.tiny import assemble_sd_pipeline, build_tokenizer, sd_scheduler_config

CLIP_VOCAB_SIZE = 49408  # CLIP's embedding size; our offline character-level tokenizer uses its first ids


def clip_config(tokenizer: CLIPTokenizer | None, **sizes) -> CLIPTextConfig:
    special_ids = {} if tokenizer is None else {
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, **special_ids, **sizes)


def clip_l(tokenizer: CLIPTokenizer | None = None) -> CLIPTextModel:
    """CLIP ViT-L/14's text encoder: SD 1.5's, and the first of SDXL's and FLUX's."""
    return CLIPTextModel(clip_config(tokenizer, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, hidden_act="quick_gelu"))


def sd_vae(**overrides) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        **{"latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215, **overrides},
    )


def sd15_components(tokenizer: CLIPTokenizer | None = None) -> dict:
    """The models (no scheduler: it holds tensors that cannot live on the meta device)."""
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


def build_sd15_random_pipeline(
    workdir: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> StableDiffusionPipeline:
    tokenizer = build_tokenizer(workdir / "tokenizer-src")
    with initialised_on(device, dtype):
        models = sd15_components(tokenizer)
    scheduler = PNDMScheduler(**sd_scheduler_config(), skip_prk_steps=True)
    return assemble_sd_pipeline(**models, tokenizer=tokenizer, scheduler=scheduler)
