"""`unified serve` and `PolicyClient`: the same decisions through the loopback socket as in process, malformed
requests answered with an error while the server keeps serving, concurrent clients, closed loop through it."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from unified.eval.closed_loop import closed_loop
from unified.eval.latency import observations, serve_overhead
from unified.tokenizers.fit import Tokenizers

from unified.errors import UnifiedError
from unified.model import ModelConfig, UnifiedModel
from unified.model_dir import save_model
from unified.policy import Policy
from unified.serve import PolicyClient, PolicyServer, encode_array

TINY = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_position_embeddings=256, horizon=4,
            max_reason_tokens=6)


@pytest.fixture(scope="module")
def exported(model_data, tmp_path_factory):
    tokenizers = Tokenizers.from_pretrained(model_data / "tok")
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("served") / "model"
    save_model(UnifiedModel(ModelConfig(**TINY), tokenizers.layout), tokenizers, directory)
    return directory


@pytest.fixture(scope="module")
def server(exported):
    server = PolicyServer(Policy.from_pretrained(exported), ("127.0.0.1", 0), model="model", fingerprint="abc")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def post(server, body: bytes, path: str = "/act", headers=None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    connection.request("POST", path, body=body, headers=headers or {"Content-Type": "application/json"})
    response = connection.getresponse()
    reply = json.loads(response.read())
    connection.close()
    return response.status, reply


def test_the_client_decides_as_the_policy_does_in_process(server, exported, model_data):
    policy, client = Policy.from_pretrained(exported), PolicyClient(server.url)
    assert client.config == policy.config and client.info["fingerprint"] == "abc"
    for frames, instruction, state in observations(model_data / "store", 3, policy.config.history):
        for reason in (True, False):
            here = policy.act(frames, instruction, state=state, reason=reason)
            there = client.act(frames, instruction, state=state, reason=reason)
            np.testing.assert_array_equal(there.actions, here.actions)
            assert there.actions.dtype == np.float32 and there.actions.shape == (4, 2)
            assert there.reasoning == here.reasoning and there.tokens_generated == here.tokens_generated
        # An explanation given to read travels too.
        here = policy.act(frames, instruction, state=state, reasoning="keep lane")
        there = client.act(frames, instruction, state=state, reasoning="keep lane")
        np.testing.assert_array_equal(there.actions, here.actions)
        assert there.reasoning == "keep lane" and there.tokens_generated == here.tokens_generated == 4 * 2
    median = client.act(frames, instruction, state=state, reason=False, readout="median")
    np.testing.assert_allclose(median.actions, policy.act(frames, instruction, state=state, reason=False,
                                                          readout="median").actions)
    client.close()


def test_malformed_requests_get_an_error_and_the_server_keeps_serving(server, exported, model_data):
    frames, instruction, state = observations(model_data / "store", 1, 1)[0]
    good = {"frames": encode_array(frames), "instruction": instruction, "state": state.tolist(), "reason": False}
    bad = [
        (b"{not json", "not JSON"),
        (json.dumps([1, 2]).encode(), "expected a JSON object"),
        (json.dumps({"instruction": instruction}).encode(), "needs frames and instruction"),
        (json.dumps(good | {"speed": 3}).encode(), r"unknown field\(s\) \['speed'\]"),
        (json.dumps(good | {"frames": encode_array(frames[..., :2])}).encode(), r"expected frames of shape"),
        (json.dumps(good | {"frames": {"shape": [9], "dtype": "uint8", "data": "AAAA"}}).encode(),
         "do not make an array"),
        (json.dumps(good | {"state": [1.0]}).encode(), "state: expected"),
        (json.dumps(good | {"reason": "yes"}).encode(), "reason: expected bool"),
        (json.dumps(good | {"reasoning": 3}).encode(), "reasoning: expected str"),
        (json.dumps(good | {"reasoning": "keep lane"}).encode(), "reason=False skips the reasoning"),
        (json.dumps(good | {"readout": "best"}).encode(), "readout: 'best' is not one of"),
        (json.dumps(good | {"instruction": ""}).encode(), "instruction is empty"),
    ]
    import re

    for body, message in bad:
        status, reply = post(server, body)
        assert status == 400 and re.search(message, reply["error"]), (body[:60], reply)
    status, reply = post(server, b"{}", path="/elsewhere")
    assert status == 404 and "POST /act" in reply["error"]
    status, reply = post(server, b"x", headers={"Content-Length": str(1 << 30)})
    assert status == 413
    status, reply = post(server, b"", headers={"Content-Length": "-5"})
    assert status == 411 and "Content-Length" in reply["error"]
    status, reply = post(server, json.dumps(good).encode())
    assert status == 200 and np.asarray(reply["actions"]["shape"]).tolist() == [4, 2]
    with pytest.raises(UnifiedError, match="state: expected"):  # the client raises the server's message
        PolicyClient(server.url).act(frames, instruction, state=[1.0], reason=False)


def test_concurrent_clients_get_what_each_asked_for(server, exported, model_data):
    policy = Policy.from_pretrained(exported)
    seen = observations(model_data / "store", 8, 1)
    expected = [policy.act(f, i, state=s, reason=False).actions for f, i, s in seen]
    results: dict[int, np.ndarray] = {}
    errors = []

    def work(k: int) -> None:
        try:
            client = PolicyClient(server.url)
            for j in range(k % 2, len(seen), 2):  # two clients share each observation, in different orders
                f, i, s = seen[j]
                results[(k, j)] = client.act(f, i, state=s, reason=False).actions
            client.close()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 16
    for (_, j), actions in results.items():
        np.testing.assert_array_equal(actions, expected[j])


def test_closed_loop_through_the_server_drives_as_in_process(server, exported, model_data, tmp_path):
    kwargs = dict(scenarios=model_data / "suite.yaml", episodes=2, mode="direct", replan_every=1, no_ensemble=True,
                  device="cpu", progress=False)
    here = closed_loop(model=str(exported), **kwargs)
    there = closed_loop(model=server.url, json=tmp_path / "remote.json", **kwargs)
    assert there["episodes"] == here["episodes"] and there["fingerprint"] == "abc"
    assert json.loads((tmp_path / "remote.json").read_text())["model_path"] == server.url
    with pytest.raises(UnifiedError, match="policy server http://127.0.0.1:1: ConnectionRefusedError"):
        PolicyClient("http://127.0.0.1:1")
    with pytest.raises(UnifiedError, match="http://HOST:PORT"):
        PolicyClient("ws://127.0.0.1:8000")


def test_serve_overhead_bench(exported, model_data, tmp_path, capsys):
    report = serve_overhead(model=exported, data=model_data / "store", decisions=4, json=tmp_path / "s.json",
                            progress=False)
    assert report["decisions"] == 4 and report["in_process_median_ms"] > 0
    assert report["server_median_ms"] > 0 and report["overhead_median_ms"] > 0
    assert "overhead beyond the model's own time" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["report"] == "serve-latency"


def test_the_serve_command_answers_and_stops_on_sigterm(exported):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "unified.cli", "serve", "--model", str(exported), "--port",
                                str(port), "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while True:
            try:
                client = PolicyClient(f"http://127.0.0.1:{port}")
                break
            except UnifiedError:
                assert process.poll() is None and time.time() < deadline, process.stderr.read()
                time.sleep(0.5)
        assert client.info["model"] == "model" and len(client.info["fingerprint"]) == 64
        client.close()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert f"on http://127.0.0.1:{port}" in out and "server stopped" in out
