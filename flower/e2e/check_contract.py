"""Checks that flower/proto/transport.proto declares the wire contract flwr serves.

Compares the descriptor our codegen committed (flower/src/generated/
transport.descriptor.bin) with the descriptor of the installed flwr's transport
messages: package, service and method signatures, every message, enum value, field
number, type, label, oneof membership and map entry. Names of comments and layout do
not matter on the wire and are not compared.

Usage: python check_contract.py DESCRIPTOR_SET   (exit 1 on any difference)
"""

import sys

from google.protobuf import descriptor_pb2
from flwr.proto import transport_pb2


def shape(fd):
    out = {"package": fd.package, "syntax": fd.syntax or "proto2"}

    def message(m, prefix):
        name = prefix + m.name
        out[name + " options.map_entry"] = m.options.map_entry
        out[name + " oneofs"] = [o.name for o in m.oneof_decl]
        for f in m.field:
            out[f"{name}.{f.name}"] = (
                f.number,
                f.label,
                f.type,
                f.type_name,
                f.oneof_index if f.HasField("oneof_index") else None,
                f.proto3_optional,
            )
        for e in m.enum_type:
            out[f"{name}.{e.name}"] = [(v.name, v.number) for v in e.value]
        for n in m.nested_type:
            message(n, name + ".")

    for m in fd.message_type:
        message(m, "")
    for e in fd.enum_type:
        out["enum " + e.name] = [(v.name, v.number) for v in e.value]
    for s in fd.service:
        for me in s.method:
            out[f"rpc {s.name}.{me.name}"] = (
                me.input_type,
                me.output_type,
                me.client_streaming,
                me.server_streaming,
            )
    return out


def main():
    ours_set = descriptor_pb2.FileDescriptorSet()
    with open(sys.argv[1], "rb") as f:
        ours_set.ParseFromString(f.read())
    ours = [fd for fd in ours_set.file if fd.package == "flwr.proto"]
    if len(ours) != 1:
        sys.exit(f"expected one flwr.proto file in {sys.argv[1]}, found {len(ours)}")
    theirs = descriptor_pb2.FileDescriptorProto()
    transport_pb2.DESCRIPTOR.CopyToProto(theirs)
    a, b = shape(ours[0]), shape(theirs)
    diffs = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    for k in diffs:
        print(f"contract differs at {k}: ours {a.get(k)!r}, flwr {b.get(k)!r}")
    if diffs:
        sys.exit(1)
    print(f"contract: {len(a)} descriptor entries identical to flwr's transport.proto")


if __name__ == "__main__":
    main()
