"""How a deployed server talks to remote clients.

Only ``pollinate.transport.grpc`` exists today: a gRPC service on which each client dials out,
registers, takes train/evaluate tasks and streams back results. Importing this package imports
no transport library; grpc is imported by the modules that need it.
"""

DEFAULT_RESULT_MEMORY_BYTES = 256 << 20  # client results a server holds at once (see ResultMemory)
