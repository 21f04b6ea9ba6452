"""The request schema is the one declaration of every field: what may share a pipeline call is declared
on it, and the flags and the published schema come from it."""

import argparse

import pytest
from pydantic import Field

from handlers.core.flags import add_schema_arguments, schema_values
from handlers.core.generation import ImageGenerator
from handlers.core.schema import (
    SHARED_IN_BATCH,
    GenerationDefaults,
    GenerationRequest,
    request_json_schema,
    shared,
    shared_fields,
)
from tests.unit.helpers import serve


class WithANewField(GenerationRequest):
    """A parameter someone adds without saying whether batch-mates may differ in it."""

    sharpness: float = Field(1.0, ge=0, le=2, description="a new parameter")


class WithANewSharedField(GenerationRequest):
    """The same parameter, declared shared: it acts on each image alone, like a seed."""

    sharpness: float = shared(1.0, ge=0, le=2, description="a new parameter")


def test_a_new_field_splits_a_batch_unless_declared_shared():
    split = [WithANewField(prompt="a", seed=1, sharpness=value) for value in (1.0, 1.5)]
    assert split[0].batch_key() != split[1].batch_key()
    together = [WithANewSharedField(prompt=prompt, seed=seed, sharpness=value)
                for prompt, seed, value in (("a", 1, 1.0), ("b", 2, 1.5))]
    assert together[0].batch_key() == together[1].batch_key()


def test_the_generator_groups_by_the_declaration(tiny_pipeline_dir):
    generator: ImageGenerator = serve(tiny_pipeline_dir, batching="combined").service.generator
    assert generator.groups([WithANewField(prompt="a", sharpness=1.0), WithANewField(prompt="b", sharpness=2.0)]) == [[0], [1]]
    assert generator.groups([WithANewSharedField(prompt="a", sharpness=1.0),
                             WithANewSharedField(prompt="b", sharpness=2.0)]) == [[0, 1]]


def test_what_batch_mates_may_differ_in():
    assert shared_fields(GenerationRequest) == {
        "prompt", "negative_prompt", "seed", "num_images_per_prompt", "output_format", "quality", "image",
        "mask_image", "control_image", "stream"}


@pytest.mark.parametrize("field, value", [("num_inference_steps", 5), ("guidance_scale", 2.0), ("height", 128),
                                          ("scheduler", "euler"), ("lora_weight", 0.5), ("use_refiner", False)])
def test_every_field_that_changes_the_call_splits_the_batch(field, value):
    assert GenerationRequest(prompt="a").batch_key() != GenerationRequest(prompt="a", **{field: value}).batch_key()


def test_a_negative_prompt_given_or_not_splits_but_its_text_does_not():
    none, blurry, dark = (GenerationRequest(prompt="a", negative_prompt=text) for text in (None, "blurry", "dark"))
    assert none.batch_key() != blurry.batch_key() and blurry.batch_key() == dark.batch_key()


def test_the_published_schema_marks_the_shared_fields_and_takes_a_models_defaults():
    schema = request_json_schema(GenerationDefaults(num_inference_steps=9))
    assert schema["properties"]["seed"][SHARED_IN_BATCH] is True
    assert SHARED_IN_BATCH not in schema["properties"]["num_inference_steps"]
    assert schema["properties"]["num_inference_steps"]["default"] == 9
    assert schema["required"] == ["prompt"]


def test_flags_are_the_schemas_fields_with_their_choices():
    parser = argparse.ArgumentParser()
    add_schema_arguments(parser, GenerationRequest, skip=("prompt",))
    args = parser.parse_args(["--num-inference-steps", "12", "--scheduler", "euler", "--use-refiner", "false",
                              "--lora", '{"style": 0.5}'])
    assert schema_values(args, GenerationRequest) == {
        "num_inference_steps": 12, "scheduler": "euler", "use_refiner": False, "lora": {"style": 0.5}}
    with pytest.raises(SystemExit):
        parser.parse_args(["--scheduler", "magic"])
    flags = {action.dest for action in parser._actions} - {"help"}
    assert flags == set(GenerationRequest.model_fields) - {"prompt"}
