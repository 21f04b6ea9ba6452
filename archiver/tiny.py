"""Tiny Stable-Diffusion-shaped pipelines built from code, for tests and offline demos.

The shapes follow diffusers' own `get_dummy_components()`, with one change that
matters here: the VAE downsamples 8x like real SD and attention sits only at the
coarsest UNet level, so even the 768x768 default finishes in seconds on a CPU.
"""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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


def clip_text_encoder(tokenizer: CLIPTokenizer, **sizes) -> CLIPTextModel:
    """A randomly initialised CLIP text encoder whose special tokens match the tokenizer's."""
    return CLIPTextModel(
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


def build_tiny_pipeline(workdir: Path, seed: int = 0) -> StableDiffusionPipeline:
    """A seeded, randomly initialised SD pipeline of a few MB."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(workdir / "tokenizer-src")
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_add_attention=False,
        sample_size=256,
    )
    text_encoder = clip_text_encoder(
        tokenizer, hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4, max_position_embeddings=77
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    return assemble_sd_pipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
