"""Names that settings take and server modules check, defined once.

In a module of their own with no imports: server.config reads them before grpc may be imported
(server.cli sets grpc's environment defaults first, see server/grpc_runtime.py), and the modules
that use them (auth policy, trace backends, local servers) import grpc.
"""

AUTH_MODES = ("auto", "required", "off")
BACKEND_NAMES = ("sqlite", "postgres", "clickhouse", "socket")
LOCAL_AUTH_TYPES = ("bearer_token", "api_key")
