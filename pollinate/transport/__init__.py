"""How a deployed server talks to remote clients.

Only ``pollinate.transport.grpc`` exists today: a gRPC service on which each client dials out,
registers, takes train/evaluate tasks and streams back results. Importing this package imports
no transport library; grpc is imported by the modules that need it.
"""

DEFAULT_RESULT_MEMORY_BYTES = 256 << 20  # client results a server holds at once (see ResultMemory)
DEFAULT_RESULT_SIZE_FACTOR = 4.0  # a result may take this many times the task's Arrays payload
DEFAULT_MIN_RESULT_BYTES = 8 << 20  # ... and at least this much (small models, analytics)
DEFAULT_STALL_S = 30.0  # a result whose bytes stop this long has its stream closed
DEFAULT_MAX_STREAMS = 1000  # streams open at once
DEFAULT_MAX_UNREGISTERED = 128  # of which not registered yet
DEFAULT_REGISTER_TIMEOUT_S = 10.0  # a stream must send its Register within this
DEFAULT_MAX_CORRUPT_UPLOADS = 3  # a client whose uploads fail their SHA-256 this often in a row
