"""An OTLP/gRPC trace receiver, from the OpenTelemetry project's own
protocol definitions (opentelemetry-proto) and gRPC server (grpcio).

Usage: python3 otlp_receiver.py [--quiet]
Listens on a free port of 127.0.0.1, prints `port <n>`, then one JSON line
per span it receives: ids in hex, name, kind, the resource's service.name
and the span's attributes. With --quiet (the bench) it only answers, so
that its own CPU stays out of what is measured.
"""

import json
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


QUIET = "--quiet" in sys.argv[1:]

# Exports arrive on several gRPC threads at once (one per exporting
# process): each line is written whole, under the lock, so that two
# spans' lines never interleave.
WRITING = threading.Lock()


def emit(line):
    with WRITING:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        if QUIET:
            return trace_service_pb2.ExportTraceServiceResponse()
        for resource_spans in request.resource_spans:
            resource = {a.key: value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    emit(json.dumps({
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": span.kind,
                        "service": resource.get("service.name"),
                        "scope": scope_spans.scope.name,
                        "status": span.status.code,
                        "attributes": {a.key: value(a.value) for a in span.attributes},
                    }))
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"port {port}", flush=True)
    # Until the test kills it, or its stdin (the test's pipe) closes.
    sys.stdin.read()
    server.stop(0)


if __name__ == "__main__":
    main()
