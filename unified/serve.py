"""A policy over HTTP: `unified serve --model EXPORT` answers observations with action chunks, and `PolicyClient`
is a `Policy` that asks it, so that a simulator or a robot in another process (or on another machine) drives
with the model, and `eval closed-loop --model http://HOST:PORT` drives through the socket exactly as in process.

Protocol (JSON over HTTP/1.1, keep-alive; arrays as {"shape", "dtype", "data": base64 of the C-order bytes}):

    GET  /info -> {"model", "fingerprint", "config": the model's ModelConfig, "image_size", "state_names",
                   "action_names", "readouts"}
    POST /act  <- {"frames": array (T, H, W, 3) uint8, newest last, "instruction": str, "state": [float] | null,
                   "reason": bool, "readout": "mode" | "mean" | "median", "continuous": bool, "greedy": bool,
                   "temperature": float, "seed": int, "fast_decoding": "whole" | "free" (a FAST model's),
                   "reasoning": str (with reason: an explanation to read instead of writing one)}
               -> {"actions": array (H, 2) float32, "reasoning": str | null, "tokens_generated": int,
                   "latency_ms": the model's own time, "malformed": null, or why the action tokens did not make
                   a whole chunk (see `ActionResult.malformed`)}
    an error -> status 400 (a bad request: its cause names the field) or 500, {"error": message}

Requests are served on threads, one model call at a time (the model is shared; a lock orders the calls), so
any number of clients may connect; a malformed request gets its error reply and the server keeps serving.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np

from unified.errors import UnifiedError
from unified.policy import ActionResult
from unified.tokenizers.action import READOUTS

MAX_REQUEST_BYTES = 64 << 20  # a request bigger than this is refused before it is read
ACT_FIELDS = {"frames", "instruction", "state", "reason", "readout", "continuous", "greedy", "temperature", "seed",
              "fast_decoding", "reasoning"}


def is_url(model: str | Path) -> bool:
    return str(model).startswith(("http://", "https://"))


def encode_array(array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array)
    return {"shape": list(array.shape), "dtype": str(array.dtype), "data": base64.b64encode(array.tobytes()).decode()}


def decode_array(value: Any, name: str) -> np.ndarray:
    """An encoded array back, every way it can be malformed named as the field `name`."""
    if not isinstance(value, dict) or set(value) != {"shape", "dtype", "data"}:
        raise UnifiedError(f"{name}: expected an object with shape, dtype and data (base64), got "
                           f"{type(value).__name__}")
    try:
        dtype, shape = np.dtype(value["dtype"]), tuple(int(n) for n in value["shape"])
        raw = base64.b64decode(value["data"], validate=True)
    except (TypeError, ValueError) as e:
        raise UnifiedError(f"{name}: not a valid array ({e})") from None
    if dtype.hasobject or any(n < 0 for n in shape) or len(raw) != dtype.itemsize * int(np.prod(shape)):
        raise UnifiedError(f"{name}: {len(raw)} bytes do not make an array of shape {list(shape)} {dtype}")
    return np.frombuffer(raw, dtype).reshape(shape)


class PolicyServer(ThreadingHTTPServer):
    """A `Policy` behind an HTTP endpoint; `serve_forever()` to run, `shutdown()` (from another thread) to stop."""

    daemon_threads = True

    def __init__(self, policy, address: tuple[str, int] = ("127.0.0.1", 8000), model: str = "",
                 fingerprint: str = ""):
        self.policy, self.lock = policy, threading.Lock()
        tok = policy.tokenizers
        self.info = {"model": model, "fingerprint": fingerprint, "config": asdict(policy.config),
                     "image_size": list(tok.image.config.image_size), "state_names": list(tok.state.names),
                     "action_names": ["acceleration", "steering"][:tok.action.dim],
                     "readouts": list(READOUTS)}
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def act(self, request: Any) -> dict:
        """One /act request -> its reply; every malformed field is a UnifiedError naming it."""
        if not isinstance(request, dict):
            raise UnifiedError(f"expected a JSON object, got {type(request).__name__}")
        unknown = sorted(set(request) - ACT_FIELDS)
        if unknown:
            raise UnifiedError(f"unknown field(s) {unknown}; an /act request has {sorted(ACT_FIELDS)}")
        if "frames" not in request or "instruction" not in request:
            raise UnifiedError("an /act request needs frames and instruction")
        frames = decode_array(request["frames"], "frames").copy()  # writable, as torch wants it
        kwargs = {}
        for key, kind in (("reason", bool), ("continuous", bool), ("greedy", bool), ("readout", str),
                          ("fast_decoding", str), ("temperature", (int, float)), ("seed", int), ("reasoning", str)):
            if key in request:
                if not isinstance(request[key], kind) or (kind is not bool and isinstance(request[key], bool)):
                    raise UnifiedError(f"{key}: expected {getattr(kind, '__name__', 'a number')}, got "
                                       f"{request[key]!r}")
                kwargs[key] = request[key]
        with self.lock:
            result = self.policy.act(frames, request["instruction"], state=request.get("state"), **kwargs)
        return {"actions": encode_array(np.asarray(result.actions, np.float32)), "reasoning": result.reasoning,
                "tokens_generated": int(result.tokens_generated), "latency_ms": float(result.latency_ms),
                "malformed": result.malformed}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection per client, no handshake per decision
    server: PolicyServer

    def log_message(self, format, *args):  # one line per request would drown the console
        pass

    def setup(self):
        super().setup()
        # The reply's headers and body leave in two writes: without this the body waits for the client's delayed
        # ACK of the headers (Nagle's algorithm), 40 ms per decision on Linux.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/info":
            self._reply(200, self.server.info)
        else:
            self._reply(404, {"error": f"no such endpoint {self.path!r}: GET /info or POST /act"})

    def do_POST(self):
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            return self._reply(411, {"error": "a request needs a Content-Length of 0 or more bytes"})
        if length > MAX_REQUEST_BYTES:
            self.close_connection = True
            return self._reply(413, {"error": f"the request has {length} bytes, more than {MAX_REQUEST_BYTES}"})
        body = self.rfile.read(length)
        if self.path != "/act":
            return self._reply(404, {"error": f"no such endpoint {self.path!r}: GET /info or POST /act"})
        try:
            request = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self._reply(400, {"error": f"the body is not JSON ({e})"})
        try:
            self._reply(200, self.server.act(request))
        except UnifiedError as e:
            self._reply(400, {"error": str(e)})
        except Exception as e:  # the model failed on this request: say so, keep serving the others
            self._reply(500, {"error": f"{type(e).__name__}: {e}"})


class PolicyClient:
    """`Policy.act` through a server: the same arguments, the same `ActionResult` (its latency_ms the round
    trip). Holds one keep-alive connection; use one client per thread or process."""

    def __init__(self, url: str, timeout: float = 60.0):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise UnifiedError(f"--model {url!r}: a policy server's address is http://HOST:PORT")
        self.url, self.host, self.port, self.timeout = url, parts.hostname, parts.port or 80, timeout
        self.connection: http.client.HTTPConnection | None = None
        self.info = self._request("GET", "/info")
        from unified.model import ModelConfig

        self.config = ModelConfig(**self.info["config"])
        self.server_ms: list[float] = []  # the model's own time of each act, beside the round trip

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in (0, 1):  # a keep-alive connection the server closed is reopened once
            try:
                if self.connection is None:
                    self.connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                    self.connection.connect()
                    self.connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.connection.request(method, path, body=data, headers=headers)
                response = self.connection.getresponse()
                payload = response.read()
                break
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                if self.connection is not None:
                    self.connection.close()
                self.connection = None
                if attempt:
                    raise UnifiedError(f"policy server {self.url}: {type(e).__name__}: {e}") from None
        try:
            reply = json.loads(payload)
        except json.JSONDecodeError:
            raise UnifiedError(f"policy server {self.url}{path}: status {response.status}, not a JSON reply") from None
        if response.status != 200:
            raise UnifiedError(f"policy server {self.url}{path}: {reply.get('error', response.status)}")
        return reply

    def act(self, frames, instruction: str, state=None, reason: bool = True, greedy: bool = True,
            temperature: float = 1.0, seed: int = 0, continuous: bool = False, readout: str = "mode",
            fast_decoding: str = "whole", reasoning: str | None = None) -> ActionResult:
        start = time.perf_counter()
        frames = np.asarray(frames)
        request = {"frames": encode_array(frames), "instruction": instruction,
                   "state": None if state is None else [float(v) for v in np.asarray(state, np.float64).ravel()],
                   "reason": bool(reason), "readout": readout, "continuous": bool(continuous),
                   "greedy": bool(greedy), "temperature": float(temperature), "seed": int(seed),
                   "fast_decoding": fast_decoding} | ({} if reasoning is None else {"reasoning": reasoning})
        reply = self._request("POST", "/act", request)
        self.server_ms.append(reply["latency_ms"])
        return ActionResult(decode_array(reply["actions"], "actions").copy(), reply["reasoning"],
                            reply["tokens_generated"], 1000 * (time.perf_counter() - start), reply.get("malformed"))

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def serve(*, model: Path, host: str = "127.0.0.1", port: int = 8000,
          device: Literal["auto", "cpu", "cuda"] = "auto") -> None:
    """Serve the exported model `model` on http://HOST:PORT until Ctrl-C (or SIGTERM). `--host 0.0.0.0` serves
    other machines too; there is no authentication, so do that only on a network you trust."""
    import signal

    from unified.model_dir import resolve_device, weights_fingerprint
    from unified.policy import Policy

    if not (Path(model) / "unified.json").is_file():
        raise UnifiedError(f"--model {model}: not an exported model directory (no unified.json)")
    if not 0 <= port <= 65535:
        raise UnifiedError(f"--port: expected 0..65535, got {port}")
    policy = Policy.from_pretrained(model, device=resolve_device(device), verify="full")
    try:
        server = PolicyServer(policy, (host, port), model=Path(model).name, fingerprint=weights_fingerprint(model))
    except OSError as e:
        raise UnifiedError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None

    def stop(*_):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"serving {model} on {server.url} (GET /info, POST /act); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print("server stopped", flush=True)
