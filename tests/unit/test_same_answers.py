"""The same requests give the same bytes as before the redesign: the digits model's answers, recorded from
the core at commit bf696c8 (tests/data/digits-answers.json), in every output format, img2img, a stream's
last line, a combined batch and a refusal."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from archiver.sources import DIGITS_DIR
from tests.unit.helpers import Client, serve

RECORDED = json.loads((Path(__file__).parent.parent / "data" / "digits-answers.json").read_text())


def pattern_png() -> str:
    """The img2img request's input image, as the recording made it."""
    array = (np.indices((64, 64)).sum(axis=0) * 4 % 256).astype("uint8")
    image = Image.fromarray(np.stack([array, 255 - array, array // 2], axis=-1))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def recorded_requests() -> list[dict]:
    """The recorded bodies, the img2img image put back where the recording kept its base64."""
    bodies = [dict(answer["request"]) for answer in RECORDED["answers"]]
    for body in bodies:
        if "image" in body:
            assert body["image"] == pattern_png()
    return bodies


@pytest.fixture(scope="module")
def answers():
    client: Client = serve(DIGITS_DIR, **RECORDED["handler"])
    return client.post(*recorded_requests())


@pytest.mark.parametrize("index", range(len(RECORDED["answers"])))
def test_each_answer_is_what_it_was(answers, index):
    recorded, answer = RECORDED["answers"][index], answers[index]
    assert answer.status == recorded["status"]
    assert answer.content_type == recorded["content_type"]
    assert answer.headers == recorded["headers"]
    body = answer.body.encode() if isinstance(answer.body, str) else answer.body
    expected = base64.b64decode(recorded["body"])
    if gained_parameters(body, expected):
        # A field added to the schema since the recording shows in the json document's parameters, unset.
        assert_same_document_but_new_unset_parameters(json.loads(body), json.loads(expected))
    elif exact_bytes_comparable():
        assert body == expected
    else:
        print(f"recorded with {RECORDED['recorded_with']}, here torch {torch.__version__}: comparing pictures")
        assert_same_pictures(body, expected, answer.content_type)


def gained_parameters(body: bytes, expected: bytes) -> set[str]:
    """The parameters a json document has that the recorded one did not."""
    try:
        got, want = json.loads(body), json.loads(expected)
    except ValueError:  # an image's bytes
        return set()
    if not (isinstance(want, dict) and "parameters" in want):
        return set()
    return set(got["parameters"]) - set(want["parameters"])


def assert_same_document_but_new_unset_parameters(got: dict, want: dict) -> None:
    new = set(got["parameters"]) - set(want["parameters"])
    assert all(got["parameters"][name] is None for name in new), {name: got["parameters"][name] for name in new}
    assert {name: value for name, value in got["parameters"].items() if name not in new} == want["parameters"]
    rest = lambda document: {key: value for key, value in document.items() if key not in ("parameters", "images")}  # noqa: E731
    assert rest(got) == rest(want)
    for mine, theirs in zip(got["images"], want["images"], strict=True):
        if exact_bytes_comparable():
            assert mine == theirs
        else:
            assert_same_pictures(base64.b64decode(mine), base64.b64decode(theirs), "image/")


def exact_bytes_comparable() -> bool:
    """Bytes are comparable where torch, its CPU kernels and its thread count are the recording's; another
    torch or instruction set rounds differently, and then the pictures are compared instead."""
    recorded = RECORDED["recorded_with"]
    return (torch.__version__, torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()) == (
        recorded["torch"], recorded["cpu_capability"], recorded["threads"])


def assert_same_pictures(body: bytes, expected: bytes, content_type: str) -> None:
    """Where kernels round differently: the same structure, and every pixel within 8 grey levels."""
    if content_type.startswith("image/"):
        got, want = (np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int) for data in (body, expected))
        assert np.abs(got - want).max() <= 8
        return
    got, want = json.loads(body), json.loads(expected)
    if isinstance(want, dict) and "images" in want:
        assert {key: value for key, value in got.items() if key != "images"} == {
            key: value for key, value in want.items() if key != "images"}
        for mine, theirs in zip(got["images"], want["images"]):
            assert_same_pictures(base64.b64decode(mine), base64.b64decode(theirs), "image/")
    elif isinstance(want, list):
        assert np.abs(np.array(got, dtype=int) - np.array(want, dtype=int)).max() <= 8
    else:
        assert got == want
