#!/usr/bin/env python3
"""Regenerates arbiter_client/_gen from proto/arbiter/v1/arbiter.proto with grpcio-tools.

    python clients/python/generate.py [OUT_DIR]

The generated modules import each other with absolute names; they are rewritten to relative
imports so the package works wherever it is installed. tests/test_generated.py checks that the
committed files are what this script produces.
"""
import os
import re
import sys
import tempfile

from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))


def generate(out_dir):
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                          f"--grpc_python_out={tmp}", os.path.join(PROTO_ROOT, "arbiter", "v1", "arbiter.proto")])
        if rc != 0:
            raise SystemExit(f"protoc failed with {rc}")
        src = os.path.join(tmp, "arbiter", "v1")
        os.makedirs(out_dir, exist_ok=True)
        for name in ("arbiter_pb2.py", "arbiter_pb2.pyi", "arbiter_pb2_grpc.py"):
            with open(os.path.join(src, name)) as f:
                text = f.read()
            text = re.sub(r"^from arbiter\.v1 import arbiter_pb2 as", "from . import arbiter_pb2 as", text, flags=re.M)
            with open(os.path.join(out_dir, name), "w") as f:
                f.write(text)


if __name__ == "__main__":
    generate(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "arbiter_client", "_gen"))
