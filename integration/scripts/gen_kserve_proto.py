"""Writes the KServe v2 / Triton messages weir uses, as .proto text, from tritonclient's own
descriptors (the reference), so ours match them field for field."""
import sys
import tritonclient.grpc.service_pb2 as s
from google.protobuf.descriptor import FieldDescriptor as F

fd = s.DESCRIPTOR
METHODS = ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
           "ModelInfer", "ModelStreamInfer", "RepositoryIndex", "RepositoryModelLoad",
           "RepositoryModelUnload"]
svc = fd.services_by_name["GRPCInferenceService"]
SCALAR = {F.TYPE_DOUBLE: "double", F.TYPE_FLOAT: "float", F.TYPE_INT64: "int64",
          F.TYPE_UINT64: "uint64", F.TYPE_INT32: "int32", F.TYPE_FIXED64: "fixed64",
          F.TYPE_FIXED32: "fixed32", F.TYPE_BOOL: "bool", F.TYPE_STRING: "string",
          F.TYPE_BYTES: "bytes", F.TYPE_UINT32: "uint32", F.TYPE_SFIXED32: "sfixed32",
          F.TYPE_SFIXED64: "sfixed64", F.TYPE_SINT32: "sint32", F.TYPE_SINT64: "sint64"}

needed = []
def need(m):
    while m.containing_type is not None:  # nested types are written inside their parent
        m = m.containing_type
    if m.full_name.startswith("inference.") and m not in needed and not m.GetOptions().map_entry:
        needed.append(m)
        for f in [f for t in [m, *m.nested_types] for f in t.fields]:
            if f.message_type is not None:
                t = f.message_type
                if t.GetOptions().map_entry:
                    v = t.fields_by_name["value"]
                    if v.message_type is not None:
                        need(v.message_type)
                else:
                    need(t)
for name in METHODS:
    m = svc.methods_by_name[name]
    need(m.input_type); need(m.output_type)

def tname(f, scope):
    if f.message_type is not None:
        n = f.message_type.full_name
    elif f.enum_type is not None:
        n = f.enum_type.full_name
    else:
        return SCALAR[f.type]
    return n[len("inference."):] if n.startswith("inference.") else "." + n

def fieldline(f, scope, indent):
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        k = f.message_type.fields_by_name["key"]; v = f.message_type.fields_by_name["value"]
        return f"{indent}map<{tname(k, scope)}, {tname(v, scope)}> {f.name} = {f.number};"
    label = "repeated " if (f.is_repeated if hasattr(type(f), "is_repeated") else f.label == F.LABEL_REPEATED) else ""
    return f"{indent}{label}{tname(f, scope)} {f.name} = {f.number};"

def message(m, indent=""):
    out = [f"{indent}message {m.name} {{"]
    for n in m.nested_types:
        if not n.GetOptions().map_entry:
            out += message(n, indent + "  ")
    for e in m.enum_types:
        out.append(f"{indent}  enum {e.name} {{")
        for v in e.values:
            out.append(f"{indent}    {v.name} = {v.number};")
        out.append(f"{indent}  }}")
    in_oneof = {}
    for o in m.oneofs:
        for f in o.fields:
            in_oneof[f.name] = o.name
    done = set()
    for f in m.fields:
        if f.name in in_oneof:
            o = in_oneof[f.name]
            if o in done:
                continue
            done.add(o)
            out.append(f"{indent}  oneof {o} {{")
            for g in m.oneofs_by_name[o].fields:
                out.append(fieldline(g, m, indent + "    "))
            out.append(f"{indent}  }}")
        else:
            out.append(fieldline(f, m, indent + "  "))
    out.append(f"{indent}}}")
    return out

lines = ['// KServe v2 / Triton gRPC inference protocol: the part weir proxies and routes on.',
         '// Generated from the descriptors in the tritonclient wheel (tritonclient/grpc/service_pb2.py)',
         '// by integration/scripts/gen_kserve_proto.py; the test kserve_proto_matches_tritonclient checks it.',
         '// Field numbers follow Triton (RepositoryModelLoadRequest.model_name is 2, not KServe\'s 1).',
         'syntax = "proto3";', '', 'package inference;', '', 'service GRPCInferenceService {']
for name in METHODS:
    m = svc.methods_by_name[name]
    cs = "stream " if m.client_streaming else ""
    ss = "stream " if m.server_streaming else ""
    lines.append(f"  rpc {name}({cs}{m.input_type.name}) returns ({ss}{m.output_type.name});")
lines.append("}")
for m in needed:
    lines.append("")
    lines += message(m)
print("\n".join(lines))
