"""The TorchServe test harness reads the key file TorchServe writes in place."""

import json
import threading
import time

import pytest

from devtools.harness.torchserve import TorchServe

KEYS = {kind: {"key": f"{kind}-key"} for kind in ("inference", "management", "API")}


def test_keys_wait_for_a_half_written_key_file(tmp_path):
    key_file = tmp_path / "key_file.json"
    key_file.write_text("")
    server = TorchServe(tmp_path, tmp_path, {})

    def finish_writing():
        time.sleep(0.3)
        key_file.write_text(json.dumps(KEYS))

    writer = threading.Thread(target=finish_writing)
    writer.start()
    try:
        assert server.keys()["management"] == "management-key"
    finally:
        writer.join()


def test_keys_give_up_on_a_key_file_that_stays_broken(tmp_path):
    (tmp_path / "key_file.json").write_text('{"inference": ')
    with pytest.raises(json.JSONDecodeError):
        TorchServe(tmp_path, tmp_path, {}).keys(timeout_s=0.3)
