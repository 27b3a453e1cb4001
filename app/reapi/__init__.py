"""The Bazel / Buck2 remote cache: REAPI v2 over gRPC, in its own process.

Run as ``python -m app.reapi`` (the gunicorn master starts and supervises it).
Everything under this package may import ``grpc``; nothing the HTTP workers
import may import this package (gRPC and gevent never share a process).

Layout (one module per service, as in bazel-remote / BuildGrid):

- ``server.py``        composition root: settings, store, grpc server, signals (``main()``)
- ``observer.py``      one interceptor for every RPC: metrics, in-flight count, error mapping
- ``errors.py``        the one mapping from domain errors to gRPC status codes
- ``digests.py``       digest and resource-name parsing and validation
- ``tenancy.py``       the tenant a call names in its metadata
- ``cache.py``         REAPI view of the ArtifactStore (keys, empty blob, read/write metrics)
- ``capabilities.py``, ``action_cache.py``, ``cas.py``, ``bytestream.py``: the servicers
- ``gen/``             generated protobuf / grpc modules (``protos/generate.py``)
"""
