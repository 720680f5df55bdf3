"""The gRPC transport: one bidirectional stream per client, which dials out to the server.

``auth`` signs and verifies requests (no grpc needed); the servicer, client runtime and codec
import grpc themselves, so importing this package does not.
"""
