"""A tiny text-to-image latent diffusion model trained on scikit-learn's handwritten digits.

It has Stable Diffusion's real architecture (AutoencoderKL, UNet2DConditionModel with
cross-attention, CLIPTextModel, CLIPTokenizer, a diffusers scheduler), so
`DiffusionPipeline.from_pretrained` loads it like any SD model, and it draws the digit that
a prompt such as "digit 7", "a handwritten seven" or "7" asks for.
"""

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from archiver.sources import DIGITS_DIR
from devtools.models.tiny import assemble_sd_pipeline, clip_text_encoder, tiny_vae, write_tokenizer_files

IMAGE_SIZE = 64  # the request API's smallest size; the VAE's 8x downsampling gives the digits' own 8x8
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FILLER_WORDS = ("digit", "number", "numeral", "handwritten", "the", "a", "of", "drawing", "picture", "written")
TEMPLATES = (
    "{digit}", "digit {digit}", "the digit {digit}", "number {digit}", "the number {digit}", "numeral {digit}",
    "handwritten {digit}", "handwritten digit {digit}", "a picture of the digit {digit}",
    "{word}", "a {word}", "the number {word}", "a handwritten {word}", "handwritten {word}",
    "a drawing of a {word}", "written {word}",
)
MAX_PROMPT_TOKENS = 16
TRAIN_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
DEFAULT_WEIGHTS_DIR = DIGITS_DIR  # retraining writes over the shipped weights


@dataclass
class TrainingPlan:
    vae_steps: int = 500
    vae_batch_size: int = 32
    unet_steps: int = 1200
    batch_size: int = 256  # the tiny UNet's step cost is mostly fixed overhead, so large batches are cheap
    learning_rate: float = 1e-3
    prompt_dropout: float = 0.1  # unconditional examples, which classifier-free guidance needs
    seed: int = 0


def word_merges(words: tuple[str, ...]) -> tuple[str, ...]:
    """BPE merges that build each word from its letters, so every vocabulary word is one token."""
    merges: list[str] = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            pair = f"{merged} {symbol}"
            if pair not in merges:
                merges.append(pair)
            merged += symbol
    return tuple(merges)


def build_tokenizer(directory: Path) -> CLIPTokenizer:
    write_tokenizer_files(directory, word_merges(DIGIT_WORDS + FILLER_WORDS))
    return CLIPTokenizer.from_pretrained(directory, model_max_length=MAX_PROMPT_TOKENS)


def prompt_for(digit: int, rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(digit=digit, word=DIGIT_WORDS[digit])


def load_digit_images() -> tuple[torch.Tensor, np.ndarray]:
    """The 1,797 8x8 digits as dark ink on white, upscaled to 64x64 RGB in [-1, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    paper = 1.0 - F.interpolate(ink, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False).clamp(0, 1)
    return (paper * 2 - 1).repeat(1, 3, 1, 1), digits.target


def build_components(tokenizer: CLIPTokenizer) -> tuple[AutoencoderKL, UNet2DConditionModel, CLIPTextModel]:
    vae = tiny_vae(sample_size=IMAGE_SIZE)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(48, 96),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    text_encoder = clip_text_encoder(
        tokenizer,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_PROMPT_TOKENS,
    )
    return vae, unet, text_encoder


def train_vae(vae: AutoencoderKL, images: torch.Tensor, plan: TrainingPlan) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=plan.learning_rate)
    progress = tqdm(range(plan.vae_steps), desc="vae", dynamic_ncols=True)
    for step in progress:
        batch = images[torch.randint(len(images), (plan.vae_batch_size,))]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")


def train_denoiser(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    latents: torch.Tensor,
    labels: np.ndarray,
    plan: TrainingPlan,
) -> None:
    scheduler = DDPMScheduler(**TRAIN_SCHEDULER)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=plan.learning_rate, weight_decay=1e-2)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, plan.unet_steps)
    rng = random.Random(plan.seed)
    progress = tqdm(range(plan.unet_steps), desc="unet", dynamic_ncols=True)
    for step in progress:
        indices = torch.randint(len(latents), (plan.batch_size,))
        prompts = ["" if rng.random() < plan.prompt_dropout else prompt_for(int(labels[i]), rng) for i in indices]
        tokens = tokenizer(prompts, padding="max_length", max_length=MAX_PROMPT_TOKENS, truncation=True, return_tensors="pt")
        clean = latents[indices]
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (plan.batch_size,))
        prediction = unet(
            scheduler.add_noise(clean, noise, timesteps), timesteps, encoder_hidden_states=text_encoder(tokens.input_ids)[0]
        ).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay.step()
        if step % 25 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")


def train_digits_pipeline(workdir: Path, plan: TrainingPlan) -> StableDiffusionPipeline:
    random.seed(plan.seed)
    np.random.seed(plan.seed)
    torch.manual_seed(plan.seed)
    tokenizer = build_tokenizer(workdir / "tokenizer-src")
    images, labels = load_digit_images()
    vae, unet, text_encoder = build_components(tokenizer)

    train_vae(vae, images, plan)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        distributions = [vae.encode(chunk).latent_dist for chunk in images.split(256)]
        means = torch.cat([distribution.mean for distribution in distributions])
    # SD scales latents to unit variance; the factor is part of the VAE's saved config.
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    latents = means * vae.config.scaling_factor

    train_denoiser(unet, text_encoder, tokenizer, latents, labels, plan)
    scheduler = DDIMScheduler(**TRAIN_SCHEDULER, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return assemble_sd_pipeline(
        unet=unet.eval(), vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, scheduler=scheduler
    )


class DigitsOracle:
    """Says which digit an image shows: a classifier trained on scikit-learn's real 8x8 digits, never
    on generated images, so it measures the model from outside."""

    def __init__(self):
        from sklearn.datasets import load_digits
        from sklearn.svm import SVC

        digits = load_digits()
        self.classifier = SVC(gamma=0.001).fit(digits.data, digits.target)
        self.training_accuracy = self.classifier.score(digits.data, digits.target)

    def labels(self, images) -> list[int]:
        return [int(label) for label in self.classifier.predict(np.stack([as_digit_features(image) for image in images]))]


def digit_accuracy(pipeline: StableDiffusionPipeline, samples_per_digit: int = 5, **generation) -> float:
    """Share of generated digits that the oracle labels as asked."""
    prompts = [f"digit {digit}" for digit in range(10) for _ in range(samples_per_digit)]
    generators = [torch.Generator().manual_seed(index) for index in range(len(prompts))]
    images = pipeline(prompts, generator=generators, height=IMAGE_SIZE, width=IMAGE_SIZE, **generation).images
    expected = np.repeat(np.arange(10), samples_per_digit)
    return float((np.array(DigitsOracle().labels(images)) == expected).mean())


def as_digit_features(image) -> np.ndarray:
    """A generated image as the 8x8 ink intensities (0-16) that load_digits uses: dark ink on white."""
    from PIL import Image

    small = image.convert("L").resize((8, 8), Image.Resampling.BOX)
    return ((255 - np.asarray(small, dtype=np.float64)) / 255 * 16).reshape(-1)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="Train the tiny digits pipeline (about 15 minutes on 2 CPU cores).")
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS_DIR, help="pipeline directory (default: %(default)s)")
    parser.add_argument("--vae-steps", type=int, default=TrainingPlan.vae_steps)
    parser.add_argument("--unet-steps", type=int, default=TrainingPlan.unet_steps)
    parser.add_argument("--seed", type=int, default=TrainingPlan.seed)
    args = parser.parse_args(argv)
    started = time.monotonic()
    plan = TrainingPlan(vae_steps=args.vae_steps, unet_steps=args.unet_steps, seed=args.seed)
    with tempfile.TemporaryDirectory() as workdir:
        pipeline = train_digits_pipeline(Path(workdir), plan)
        pipeline.save_pretrained(args.out, safe_serialization=True)
    pipeline.set_progress_bar_config(disable=True)
    accuracy = digit_accuracy(pipeline, num_inference_steps=25, guidance_scale=4.0)
    size = sum(path.stat().st_size for path in args.out.rglob("*") if path.is_file())
    print(f"saved {args.out} ({size / 2**20:.1f} MB) after {(time.monotonic() - started) / 60:.1f} min; "
          f"classifier accuracy on 50 samples: {accuracy:.0%}")
    return 0
