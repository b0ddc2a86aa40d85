"""The committed stubs are what generate.py makes from the current .proto."""
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import generate  # noqa: E402


def test_committed_stubs_are_up_to_date():
    committed = os.path.join(os.path.dirname(HERE), "arbiter_client", "_gen")
    with tempfile.TemporaryDirectory() as tmp:
        generate.generate(tmp)
        for name in ("arbiter_pb2.py", "arbiter_pb2.pyi", "arbiter_pb2_grpc.py"):
            with open(os.path.join(tmp, name)) as a, open(os.path.join(committed, name)) as b:
                assert a.read() == b.read(), f"{name} is stale: run python clients/python/generate.py"
