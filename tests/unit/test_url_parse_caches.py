"""The URL parsers' caches keep only URLs of ordinary length: a caller's model_endpoint can be
tens of megabytes, and thousands of them must not stay in memory until evicted."""

from __future__ import annotations

from server.auth import endpoints
from server.providers import http


def test_normalize_url_caches_short_urls_only() -> None:
    endpoints._parse_cached.cache_clear()
    short = "https://api.example.com/v1"
    assert endpoints.normalize_url(short) == endpoints.normalize_url(short)
    assert endpoints._parse_cached.cache_info().currsize == 1
    huge = "https://api.example.com/v1/" + "a" * endpoints.MAX_CACHED_URL_CHARS
    assert endpoints.normalize_url(huge).host == "api.example.com"
    assert endpoints._parse_cached.cache_info().currsize == 1


def test_http_target_parse_caches_short_urls_only() -> None:
    http._parse_target_cached.cache_clear()
    short = "http://127.0.0.1:8080/v1/chat/completions"
    assert http.parse_target(short) is http.parse_target(short)
    assert http._parse_target_cached.cache_info().currsize == 1
    huge = "http://127.0.0.1:8080/v1/" + "a" * endpoints.MAX_CACHED_URL_CHARS
    assert http.parse_target(huge).host == "127.0.0.1"
    assert http._parse_target_cached.cache_info().currsize == 1
