"""Prints, as JSON, every message and the service of tritonclient's grpc_service.proto:
the reference weir's control-api/proto/inference/grpc_service.proto must match."""
import json
import tritonclient.grpc.service_pb2 as s

fd = s.DESCRIPTOR
out = {"messages": {}, "methods": {}}

def walk(m):
    fields = []
    for f in m.fields:
        t = f.message_type or f.enum_type
        fields.append({
            "name": f.name, "number": f.number, "type": f.type,
            "repeated": f.is_repeated if hasattr(type(f), "is_repeated") else f.label == 3,
            "type_name": ("." + t.full_name) if t else "",
            "oneof": f.containing_oneof.name if f.containing_oneof else "",
        })
    out["messages"]["." + m.full_name] = fields
    for n in m.nested_types:
        walk(n)

for m in fd.message_types_by_name.values():
    walk(m)
for m in fd.services_by_name["GRPCInferenceService"].methods:
    out["methods"][m.name] = ["." + m.input_type.full_name, "." + m.output_type.full_name,
                              m.client_streaming, m.server_streaming]
print(json.dumps(out))
