"""Tiny pipelines and adapters of every family, built from code for tests and offline demos.

The shapes follow diffusers' own `get_dummy_components()`, with one change that
matters here: the VAE downsamples 8x like real SD and attention sits only at the
coarsest UNet level, so even the 768x768 default finishes in seconds on a CPU.
"""

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

# Shared by every tiny CLIP text encoder.
CLIP_SIZES = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "max_position_embeddings": 77}
SDXL_TIME_EMBED = 8

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-to-printable-character table of GPT-2/CLIP byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def write_tokenizer_files(directory: Path, merges: tuple[str, ...] = ()) -> None:
    """Write a character-level CLIP vocabulary: every byte, alone and word-final."""
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_tokens = symbols + [symbol + "</w>" for symbol in symbols]
    vocab_tokens += ["".join(pair.split()) for pair in merges]
    vocab_tokens += list(SPECIAL_TOKENS)
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")


def build_tokenizer(directory: Path) -> CLIPTokenizer:
    write_tokenizer_files(directory)
    return CLIPTokenizer.from_pretrained(directory, model_max_length=77)


def clip_text_encoder(tokenizer: CLIPTokenizer, with_projection: bool = False, **sizes) -> CLIPTextModel:
    """A randomly initialised CLIP text encoder whose special tokens match the tokenizer's."""
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sizes,
        )
    )


def assemble_sd_pipeline(**components) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline from its five components, without a safety checker."""
    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def tiny_unet(**overrides) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        **{
            "sample_size": 32,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
            "norm_num_groups": 8,
            **overrides,
        }
    )


def tiny_vae(**overrides) -> AutoencoderKL:
    """An 8x VAE like real SD's, so latents stay small at real image sizes."""
    return AutoencoderKL(
        **{
            "block_out_channels": (16, 16, 32, 32),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "latent_channels": 4,
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "mid_block_add_attention": False,
            "sample_size": 256,
            **overrides,
        }
    )


def sd_scheduler_config() -> dict:
    return {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


def build_tiny_pipeline(workdir: Path, seed: int = 0) -> StableDiffusionPipeline:
    """A seeded, randomly initialised SD 1.x-shaped pipeline of a few MB."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(workdir / "tokenizer-src")
    text_encoder = clip_text_encoder(tokenizer, num_hidden_layers=5, **CLIP_SIZES)
    scheduler = DDIMScheduler(**sd_scheduler_config(), clip_sample=False, set_alpha_to_one=False)
    return assemble_sd_pipeline(
        unet=tiny_unet(), vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
    )


def sdxl_unet(text_dim: int, time_ids: int) -> UNet2DConditionModel:
    """SDXL's conditioning: pooled text and time ids (size and crop; the refiner adds an aesthetic score)."""
    return tiny_unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=time_ids * SDXL_TIME_EMBED + CLIP_SIZES["hidden_size"],
        cross_attention_dim=text_dim,
    )


def build_tiny_sdxl(workdir: Path, seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL's shape: two CLIP text encoders (the second with a projection) and a text_time UNet."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(workdir / "tokenizer-src")
    text_dim = 2 * CLIP_SIZES["hidden_size"]  # the two encoders' hidden states are concatenated
    return StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=clip_text_encoder(tokenizer, num_hidden_layers=2, **CLIP_SIZES),
        text_encoder_2=clip_text_encoder(tokenizer, with_projection=True, num_hidden_layers=2, projection_dim=32, **CLIP_SIZES),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=sdxl_unet(text_dim, time_ids=6),
        scheduler=EulerDiscreteScheduler(**sd_scheduler_config(), timestep_spacing="leading"),
    )


def build_tiny_sdxl_refiner(base: StableDiffusionXLPipeline, seed: int = 1) -> StableDiffusionXLImg2ImgPipeline:
    """An SDXL refiner for `base`: its second text encoder and VAE, and a UNet conditioned on aesthetic scores."""
    torch.manual_seed(seed)
    return StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=sdxl_unet(CLIP_SIZES["hidden_size"], time_ids=5),
        scheduler=EulerDiscreteScheduler(**sd_scheduler_config(), timestep_spacing="leading"),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )


def build_t5_tokenizer() -> T5Tokenizer:
    """A character-level unigram T5 tokenizer, built without a sentencepiece file."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(character, -1.0) for character in "▁abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=32)


def build_tiny_flux(workdir: Path, seed: int = 0) -> FluxPipeline:
    """FLUX's shape: a CLIP and a T5 text encoder, and a rectified-flow transformer over 2x2 latent patches."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(workdir / "tokenizer-src")
    t5_tokenizer = build_t5_tokenizer()
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x a 2x2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=clip_text_encoder(tokenizer, num_hidden_layers=2, **CLIP_SIZES),
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def build_tiny_controlnet(unet: UNet2DConditionModel, seed: int = 0) -> ControlNetModel:
    """A ControlNet for `unet`, its zero-initialised convolutions given random weights.

    Trained ControlNets start from zeros too, but untrained zeros would make the ControlNet a no-op,
    and the tests must see it steer.
    """
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet)
    zero_initialised = [
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
        controlnet.controlnet_cond_embedding.conv_out,
    ]
    for block in zero_initialised:
        torch.nn.init.normal_(block.weight, std=0.5)
    return controlnet


def write_tiny_lora(unet: UNet2DConditionModel, target: Path, seed: int = 0) -> Path:
    """A rank-4 LoRA on the UNet's attention projections, random in both factors so that it changes images."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    unet.add_adapter(config, adapter_name="tiny")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="tiny"))
    unet.delete_adapters("tiny")
    StableDiffusionPipeline.save_lora_weights(target, unet_lora_layers=layers, safe_serialization=True)
    return target
