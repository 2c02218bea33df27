"""Generate Python code for every .proto under protos/ (run by `make proto`).

The directory layout mirrors the proto packages (protos/loyalty/<domain>/v1), and
protoc runs with `-I protos`, so generated modules import as a package
(`from loyalty.member.v1 import member_pb2`), never by flat names.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate() -> int:
    for old in PROTO_ROOT.rglob("*_pb2*"):
        if old.name.endswith(GENERATED_SUFFIXES):
            old.unlink()
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={PROTO_ROOT}",
        f"--pyi_out={PROTO_ROOT}",
        f"--grpc_python_out={PROTO_ROOT}",
        *protos,
    ]
    code = protoc.main(args)
    if code == 0:
        print(f"generated code for {len(protos)} proto files")
    return int(code)


if __name__ == "__main__":
    sys.exit(generate())
