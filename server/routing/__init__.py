"""Routes: named groups of deployments (provider, model, base URL, keys), chosen by weight,
cooled down when they fail, and fallen back between inside the caller's deadline.

- `config`: the routes file (`LLMGW_ROUTES_FILE`, TOML) -> an immutable `RouteTable`.
- `health`: cooldowns, disabled keys and per-deployment limits, shared by all calls.
- `select`: the weighted choice among the healthy candidates.
- `attempts`: what a routed call records (trace, response, error metadata).
- `router`: the fallback loop the gateway hands a routed request to, and SIGHUP reloads.

Nothing here imports `server.gateway`: the router calls the gateway through `CallHost`.
"""
