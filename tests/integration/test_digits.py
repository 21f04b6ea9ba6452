"""Oracle tests: the shipped digits model draws the digit a prompt asks for, through each engine (a real
TorchServe, and Ray Serve on a real Ray cluster).

An independent scikit-learn classifier, trained here on the real 8x8 digits and never on generated
images, labels each generated image after downscaling it to 8x8.
"""

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from devtools.models.digits import DigitsOracle
from tests.integration.conftest import ENGINES, build_archive, serving

DIGITS = "digits"
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_FORMS = ("digit {digit}", "a handwritten {word}", "{digit}")


@pytest.fixture(scope="module")
def classifier():
    oracle = DigitsOracle()
    assert oracle.training_accuracy > 0.99
    return oracle


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("digits-store")
    build_archive(store, DIGITS, "--source", "digits", "--batch-size", "4", "--max-batch-delay", "300")
    return store


@pytest.fixture(scope="module", params=ENGINES)
def digits_server(request, tmp_path_factory, digits_store):
    with serving(request.param, tmp_path_factory.mktemp(request.param), digits_store, {DIGITS: f"{DIGITS}.mar"}) as server:
        yield server


def label(classifier, png: bytes) -> int:
    [digit] = classifier.labels([Image.open(io.BytesIO(png))])
    return digit


def generate(server, bodies: list[dict], concurrency: int = 4) -> list[bytes]:
    barrier = threading.Barrier(concurrency)

    def post(body):
        if len(bodies) == concurrency:
            barrier.wait()
        response = server.predict(DIGITS, json={**body, "output_format": "png"})
        assert response.status_code == 200, response.text
        return response.content

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(post, bodies))


def prompt(digit: int, form: int) -> str:
    return PROMPT_FORMS[form % len(PROMPT_FORMS)].format(digit=digit, word=WORDS[digit])


def test_the_default_size_is_the_models_native_one(digits_server):
    response = digits_server.predict(DIGITS, data="digit 3", headers={"Content-Type": "text/plain", "Accept": "image/png"})
    assert Image.open(io.BytesIO(response.content)).size == (64, 64)


def test_at_least_90_percent_of_50_requests_draw_the_digit_asked_for(digits_server, classifier):
    requests = [(digit, 5 * digit + repeat) for digit in range(10) for repeat in range(5)]
    bodies = [{"prompt": prompt(digit, seed), "seed": seed} for digit, seed in requests]
    labels = [label(classifier, png) for png in generate(digits_server, bodies)]
    correct = sum(predicted == digit for predicted, (digit, _) in zip(labels, requests))
    print(f"oracle accuracy: {correct}/50; labels {labels}")
    assert correct >= 45


def test_each_member_of_a_batch_gets_its_own_digit(digits_server, classifier):
    for digits in ((3, 8, 1, 6), (0, 7, 2, 9)):
        pngs = generate(digits_server, [{"prompt": f"digit {digit}", "seed": 100 + digit} for digit in digits])
        assert [label(classifier, png) for png in pngs] == list(digits)


def test_at_guidance_0_the_prompt_still_decides_the_digit(digits_server, classifier):
    """diffusers' meaning: w <= 1 is plain conditional sampling, which Turbo models run at w = 0."""
    requests = [(digit, 1000 + 3 * digit + repeat) for digit in range(10) for repeat in range(3)]
    guided = [{"prompt": f"digit {digit}", "seed": seed} for digit, seed in requests]
    unguided = [{**body, "guidance_scale": 0} for body in guided]

    def accuracy(bodies):
        labels = [label(classifier, png) for png in generate(digits_server, bodies)]
        return np.mean([predicted == digit for predicted, (digit, _) in zip(labels, requests)])

    guided_accuracy, unguided_accuracy = accuracy(guided), accuracy(unguided)
    print(f"accuracy at the default guidance: {guided_accuracy:.0%}, at guidance 0: {unguided_accuracy:.0%} (chance: 10%)")
    assert unguided_accuracy >= 0.5
    assert guided_accuracy >= unguided_accuracy
