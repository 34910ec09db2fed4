"""The admin HTTP listener (LLMGW_ADMIN_LISTEN): Prometheus /metrics, the web console, its JSON API.

aiohttp on the gRPC server's own event loop: every trace read goes through the async trace
readers (the same ones ProviderTraceService uses) and the overview's arithmetic runs in a thread,
so a console page never holds the loop the gRPC calls run on.
"""
