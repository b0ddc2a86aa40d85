"""A real `arbiter serve --demo` on loopback ports for the client tests, and `arbiter score` as
the reference the clients must match."""
import json
import os
import socket
import subprocess
import tempfile
import time

import pytest

from arbiter_client import ArbiterError, Client

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
BIN = os.environ.get("ARBITER_BIN", os.path.join(ROOT, "target", "debug", "arbiter"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *extra, model=None):
        self.port, self.http_port = free_port(), free_port()
        which = ["--model", str(model)] if model else ["--demo"]
        self.addr = f"127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="arbiter-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [BIN, "serve", *which, "--listen", self.addr, "--metrics-listen", "none",
             "--http-listen", f"127.0.0.1:{self.http_port}", "--openrlhf-eot", "<|im_end|>",
             "--max-batch-tokens", "2048", "--shutdown-linger-seconds", "0", *extra],
            stdout=subprocess.DEVNULL, stderr=self.log)

    def wait_ready(self, **client_options):
        deadline = time.time() + 60
        with Client(self.addr, retries=0, timeout=2, **client_options) as c:
            while True:
                try:
                    return c.model_info()
                except ArbiterError:
                    if time.time() > deadline or self.proc.poll() is not None:
                        raise RuntimeError("server did not start:\n" + open(self.log.name).read())
                    time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        os.unlink(self.log.name)


@pytest.fixture(scope="session")
def server():
    s = Server()
    s.wait_ready()
    yield s
    s.stop()


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "7"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Tell me a joke about the sea."},
     {"role": "assistant", "content": "The sea waved. Nobody waved back."}],
    [{"role": "user", "content": "Ünïcödé 日本語 🙂"}, {"role": "assistant", "content": "Ça va."}],
]


def arbiter_score(conversations, *extra):
    """Results of `arbiter score --demo` for the conversations: (reward, attributes) per line."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for c in conversations:
            f.write(json.dumps({"messages": c, **dict(extra)}) + "\n")
    out = subprocess.run([BIN, "score", "--demo", "--input", f.name], capture_output=True, text=True, check=True)
    os.unlink(f.name)
    return [(r["reward"], r["attributes"]) for r in map(json.loads, out.stdout.splitlines())]


@pytest.fixture(scope="session")
def reference():
    return arbiter_score(CONVERSATIONS)
