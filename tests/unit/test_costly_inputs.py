"""Each guard against bodies that are cheap to send and costly to refuse: refused with the field at
fault, by a check that runs before the decoder, the parser's error path or pydantic's; and the ordinary
inputs next to each guard still pass."""

import json

import pytest

from handlers.core.images import MAX_JPEG_SCANS, check_structure, MAX_PNG_CHUNKS, MAX_PNG_COMPRESSED_CHUNKS, MAX_WEBP_CHUNKS
from handlers.core.limits import MAX_REQUEST_BYTES
from handlers.core.request import MAX_ITEMS
from tests.costly_inputs import (
    animated_webp,
    b64,
    compressed_chunk_png,
    costly_bodies,
    encoded,
    jpeg_scans,
    many_chunk_png,
    many_chunk_webp,
    many_scan_jpeg,
    picture,
    png_chunk,
    png_with_chunks,
)
from tests.unit.helpers import serve


@pytest.fixture(scope="module")
def client(tiny_pipeline_dir):
    return serve(tiny_pipeline_dir, num_inference_steps=1)


def answer_to(client, body: bytes):
    [answer] = client.post(body)
    return answer


@pytest.mark.parametrize("name", list(costly_bodies()))
def test_a_costly_body_is_refused_naming_its_field_in_a_short_error(client, name):
    body, field, status = costly_bodies()[name]
    assert len(body) <= MAX_REQUEST_BYTES  # within what the engines read
    answer = answer_to(client, body)
    assert (answer.status, answer.error["field"]) == (status, field), answer.error
    assert len(answer.body) < 2000  # the first error, not one per bad item


def test_a_jpeg_is_refused_by_its_scan_count_and_common_progressive_ones_pass(client):
    ordinary = encoded(picture(), "JPEG", progressive=True)
    assert 1 < len(jpeg_scans(ordinary)) <= MAX_JPEG_SCANS
    at_the_cap = many_scan_jpeg(MAX_JPEG_SCANS, size=64)
    for data in (ordinary, at_the_cap):
        assert answer_to(client, json.dumps({"prompt": "a cat", "image": b64(data), "strength": 1}).encode()).status == 200
    refused = answer_to(client, json.dumps({"prompt": "a cat", "image": b64(many_scan_jpeg(MAX_JPEG_SCANS + 1, size=64))}).encode())
    assert refused.status == 400 and f"more than {MAX_JPEG_SCANS} scans" in refused.error["error"]


def test_a_jpeg_scan_walk_skips_stuffed_bytes_and_restart_markers():
    """Entropy-coded data holds FF00 (a stuffed FF) and FFD0-FFD7 (restarts): neither starts a segment."""
    data = encoded(picture(128), "JPEG", progressive=True, restart_marker_blocks=1)
    check_structure(data, "JPEG", "image")  # raises for a refusal
    assert len(jpeg_scans(data)) == data.count(b"\xff\xda")


# own: the chunks the file has before any are added (PNG: IHDR, IDAT, IEND; a still WebP: VP8).
@pytest.mark.parametrize("make, cap, own, message", [
    (many_chunk_png, MAX_PNG_CHUNKS, 3, "chunks"),
    (compressed_chunk_png, MAX_PNG_COMPRESSED_CHUNKS, 0, "compressed text or profile chunks"),
    (many_chunk_webp, MAX_WEBP_CHUNKS, 1, "chunks"),
])
def test_chunk_counts_are_capped_at_the_cap(client, make, cap, own, message):
    refused = answer_to(client, json.dumps({"prompt": "a cat", "image": b64(make(cap - own + 1))}).encode())
    assert refused.status == 400 and message in refused.error["error"]
    at_the_cap = json.dumps({"prompt": "a cat", "image": b64(make(cap - own)), "strength": 1}).encode()
    assert answer_to(client, at_the_cap).status == 200


def test_an_animated_webp_is_refused_and_a_still_one_passes(client):
    refused = answer_to(client, json.dumps({"prompt": "a cat", "image": b64(animated_webp(frames=3))}).encode())
    assert refused.status == 400 and "animated" in refused.error["error"]
    still = encoded(picture(), "WEBP")
    assert answer_to(client, json.dumps({"prompt": "a cat", "image": b64(still), "strength": 1}).encode()).status == 200


def test_a_png_with_a_few_text_chunks_passes(client):
    data = png_with_chunks([png_chunk(b"tEXt", b"Comment\x00made by hand")] * 3)
    assert answer_to(client, json.dumps({"prompt": "a cat", "image": b64(data), "strength": 1}).encode()).status == 200


def test_lists_and_maps_are_capped_in_items_before_validation(client):
    prompts = answer_to(client, json.dumps({"prompt": ["a cat"] * (MAX_ITEMS + 1)}).encode())
    assert prompts.status == 400 and prompts.error["allowed"] == {"max_items": MAX_ITEMS}
    loras = answer_to(client, json.dumps({"prompt": "a cat", "lora": {f"x{i}": 1 for i in range(MAX_ITEMS + 1)}}).encode())
    assert loras.status == 400 and loras.error["field"] == "lora"


@pytest.mark.parametrize("fields, field", [
    ({"prompt": [["a cat"]]}, "prompt"),
    ({"prompt": ["a cat", 5]}, "prompt"),
    ({"prompt": {"text": "a cat"}}, "prompt"),
    ({"prompt": "a cat", "seed": [1, 2]}, "seed"),
    ({"prompt": "a cat", "width": {"value": 64}}, "width"),
    ({"prompt": "a cat", "lora": {"style": [1]}}, "lora"),
    ({"prompt": "a cat", "lora": ["style"]}, "lora"),
])
def test_a_container_where_a_field_takes_none_is_refused_by_name(client, fields, field):
    answer = answer_to(client, json.dumps(fields).encode())
    assert (answer.status, answer.error["field"]) == (400, field)


def test_a_text_body_that_looks_like_deep_json_stays_a_prompt(client):
    answer = answer_to(client, b"{" + b"[" * 100 + b" a cat")  # sent as JSON, but not JSON: a 400 naming the body
    assert answer.status == 400 and answer.error["field"] == "body"
    [as_text] = client.post("{[[[ a cat", content_type="text/plain")
    assert as_text.status == 200


def test_work_counts_denoiser_evaluations_so_heun_costs_2n_minus_1(tiny_pipeline_dir):
    steps, guided = 4, 2  # guidance 7.5 evaluates the denoiser twice per step
    budget = serve(tiny_pipeline_dir, max_work=steps * guided * 64 * 64)
    euler = budget.post({"prompt": "a cat", "scheduler": "euler", "num_inference_steps": steps})[0]
    assert euler.status == 200
    [heun] = budget.post({"prompt": "a cat", "scheduler": "heun", "num_inference_steps": steps})
    assert heun.status == 413 and f"{guided * (2 * steps - 1)} denoiser evaluations" in heun.error["error"]
    [unguided] = budget.post({"prompt": "a cat", "scheduler": "heun", "num_inference_steps": steps, "guidance_scale": 1})
    assert unguided.status == 200  # 7 evaluations, within the 8 of the budget


def test_the_pipelines_own_second_order_sampler_is_counted_for_requests_that_name_none(tiny_pipeline_dir, tmp_path):
    from diffusers import HeunDiscreteScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipeline.scheduler = HeunDiscreteScheduler.from_config(pipeline.scheduler.config)
    pipeline.save_pretrained(tmp_path / "heun", safe_serialization=True)
    budget = serve(tmp_path / "heun", max_work=7 * 2 * 64 * 64)
    assert budget.post({"prompt": "a cat", "num_inference_steps": 4})[0].status == 200
    [refused] = budget.post({"prompt": "a cat", "num_inference_steps": 5})  # 9 evaluations, twice with guidance
    assert refused.status == 413 and "18 denoiser evaluations" in refused.error["error"]


def test_the_loaded_model_is_out_of_the_garbage_collectors_reach(client):
    """A request that allocates a million objects must not make each full collection walk the model's."""
    import gc

    assert gc.get_freeze_count() > 100_000
