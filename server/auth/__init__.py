"""Gateway keys, BYOK providers, endpoint policy and secret redaction.

actor.py      Actor, ANONYMOUS (the caller of a call)
policy.py     LLMGW_AUTH decision, Authenticator (metadata -> Actor), require_admin
store.py      AuthStore (keys + providers, caches);
factory.py    create_auth_store(settings) for LLMGW_KEY_STORE, where keys live;
              backends in store_sqlite.py / store_postgres.py, imported lazily
crypto.py     AES-256-GCM encryption of BYOK keys under LLMGW_ENCRYPTION_KEY
byok.py       create_byok_provider / resolve_byok
endpoints.py  EndpointPolicy (which URLs a call may reach), key_allowed_for, is_forbidden_address
resolver.py   SafeResolver: connection-time refusal of forbidden addresses (HTTP client)
redact.py     Redactor, install_log_redaction; redact_url, redact_text, describe_error
cli.py        `llm-gateway keys create|list|revoke`
"""
