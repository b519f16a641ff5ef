"""Drives a KServe v2 / Triton gRPC endpoint with the real tritonclient and prints what it saw
as JSON. Usage: triton_client.py HOST:PORT MODEL MAX_TOKENS [COMPRESSION]: with COMPRESSION
(gzip or deflate) the inference requests go compressed."""
import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient

url, model, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
compression = sys.argv[4] if len(sys.argv) > 4 else None
client = grpcclient.InferenceServerClient(url=url)
out = {
    "server_ready": client.is_server_ready(),
    "model_ready": client.is_model_ready(model),
    "metadata": client.get_model_metadata(model, as_json=True),
}

prompt = grpcclient.InferInput("PROMPT", [1], "BYTES")
prompt.set_data_from_numpy(np.array([b"hello"], dtype=np.object_))
result = client.infer(model, [prompt], request_id="unary-1", compression_algorithm=compression)
out["unary"] = {
    "id": result.get_response().id,
    "version": result.get_response().model_version,
    "token": result.as_numpy("TOKEN")[0].decode(),
}

responses = queue.Queue()
client.start_stream(callback=lambda result, error: responses.put((result, error)),
                    compression_algorithm=compression)
streamed = []
for request in range(2):
    client.async_stream_infer(model, [prompt], request_id=f"stream-{request}",
                              parameters={"max_tokens": max_tokens})
    while True:
        result, error = responses.get(timeout=10)
        if error is not None:
            streamed.append({"error": str(error)})
            break
        r = result.get_response()
        final = r.parameters["triton_final_response"].bool_param
        streamed.append({"id": r.id, "token": result.as_numpy("TOKEN")[0].decode(), "final": final})
        if final:
            break
client.stop_stream()
out["stream"] = streamed
# Close explicitly: left to __del__ at interpreter exit, grpc's channel close can wait forever.
client.close()
print(json.dumps(out), flush=True)
