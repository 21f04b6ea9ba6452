"""SD 1.x/2.x ship a safety checker: its flags reach the client, and only a flagged image is replaced.

The checker here is diffusers' StableDiffusionSafetyChecker at a tiny size with random weights. Its
rule is a threshold per concept on the cosine distance between an image's embedding and the
concept's; the test sets the threshold between the distances of two generated images, so exactly
one of them is flagged.
"""

import base64
import json

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor

from devtools.models.tiny import build_tiny_pipeline
from tests.unit.helpers import pixels, serve

REQUEST = {"prompt": "a red square", "seed": 5, "num_images_per_prompt": 2, "output_format": "json"}
NEVER = 1e3  # a threshold no cosine distance reaches


def tiny_checker() -> StableDiffusionSafetyChecker:
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                       "image_size": 32, "patch_size": 4},
        projection_dim=32,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    checker.concept_embeds.data.normal_()
    checker.special_care_embeds.data.normal_()
    checker.concept_embeds_weights.data.fill_(NEVER)
    checker.special_care_embeds_weights.data.fill_(NEVER)
    return checker


def save_with_checker(pipeline_dir, checker) -> None:
    pipeline = build_tiny_pipeline(pipeline_dir.parent / "work")
    pipeline.register_modules(
        safety_checker=checker, feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    )
    pipeline.register_to_config(requires_safety_checker=True)
    pipeline.save_pretrained(pipeline_dir, safe_serialization=True)


def image_embeds(pipeline, images: list[Image.Image]) -> torch.Tensor:
    """Each image's embedding, as the checker computes it."""
    checker = pipeline.safety_checker
    inputs = pipeline.feature_extractor(images, return_tensors="pt")
    with torch.no_grad():
        return checker.visual_projection(checker.vision_model(inputs.pixel_values)[1])


def decoded(document: dict) -> list[np.ndarray]:
    return [pixels(base64.b64decode(image)) for image in document["images"]]


@pytest.fixture(scope="module")
def checked_dir(tmp_path_factory):
    pipeline_dir = tmp_path_factory.mktemp("checked") / "pipeline"
    save_with_checker(pipeline_dir, tiny_checker())
    return pipeline_dir


def test_nothing_flagged_is_reported_as_such(checked_dir):
    served = serve(checked_dir)
    [body] = served.post(REQUEST)
    document = json.loads(body.body)
    assert document["nsfw_content_detected"] == [False, False]
    assert all(image.max() > 0 for image in decoded(document))
    [single] = served.post({**REQUEST, "num_images_per_prompt": 1, "output_format": "png"})
    assert single.headers["X-NSFW-Content-Detected"] == "false"
    assert pixels(single).max() > 0


def test_only_the_flagged_image_is_replaced_and_the_flags_say_which(checked_dir):
    served = serve(checked_dir)
    [clean_body] = served.post(REQUEST)
    clean = decoded(json.loads(clean_body.body))
    # Concept 0 becomes the direction from the second image's embedding to the first's, and its threshold
    # falls between the two images' similarities to it: the checker flags the first image and only the
    # first. (A tiny random vision model embeds two images nearly alike, so the difference is what
    # separates them.)
    embeds = image_embeds(served.service.pipeline, [Image.fromarray(image.astype(np.uint8)) for image in clean])
    checker = served.service.pipeline.safety_checker
    checker.concept_embeds.data[0] = embeds[0] - embeds[1]
    similarities = cosine_distance(embeds, checker.concept_embeds)[:, 0].tolist()
    assert similarities[0] - similarities[1] > 0.01, similarities  # the checker rounds its scores to 3 places
    checker.concept_embeds_weights.data[0] = sum(similarities) / 2
    flagged_index = 0

    [body] = served.post(REQUEST)
    document = json.loads(body.body)
    expected = [index == flagged_index for index in range(2)]
    assert document["nsfw_content_detected"] == expected
    images = decoded(document)
    assert images[flagged_index].max() == 0  # the checker's black image
    assert np.array_equal(images[1 - flagged_index], clean[1 - flagged_index])  # its neighbour untouched
    assert body.headers["X-NSFW-Content-Detected"] == ",".join(str(flag).lower() for flag in expected)


def test_the_checker_can_be_turned_off(checked_dir):
    served = serve(checked_dir, safety_checker=False)
    assert served.service.pipeline.safety_checker is None
    [body] = served.post(REQUEST)
    document = json.loads(body.body)
    assert "nsfw_content_detected" not in document
    assert "X-NSFW-Content-Detected" not in body.headers


def test_a_pipeline_without_a_checker_reports_no_flags(tiny_pipeline_dir):
    served = serve(tiny_pipeline_dir)
    [body] = served.post(REQUEST)
    assert "nsfw_content_detected" not in json.loads(body.body)
