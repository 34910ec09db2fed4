"""Limits per gateway key and per organization: requests and tokens per minute, spend per day
and per month; counters in-process or in Redis (see `limiter` for the request path)."""
