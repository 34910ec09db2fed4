"""Who may use the console: no key, a non-admin key, another organization's trace, cookies, CSRF."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.fake_upstream import FakeUpstream
from tests.integration.admin_fixtures import console


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_console_access_on_loopback(tmp_path: Path, upstream: FakeUpstream) -> None:
    async with console(tmp_path, upstream) as c, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{c.port}"
        # No key: the API says 401, a page sends the browser to the login form.
        async with http.get(f"{base}/api/traces") as r:
            assert r.status == 401
        async with http.get(f"{base}/traces", allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/login"
        async with http.get(f"{base}/api/traces", headers=auth("llmgw-not-a-key")) as r:
            assert r.status == 401
        # Metrics are open on loopback.
        async with http.get(f"{base}/metrics") as r:
            assert r.status == 200
        # The admin sees the organization's traces, newest first, and not org-b's.
        async with http.get(f"{base}/api/traces", headers=auth(c.admin_key)) as r:
            assert r.status == 200
            ids = [t["id"] for t in (await r.json())["traces"]]
        org_a = [c.traces[n] for n in ("user", "plain-2", "plain-1", "plain-0", "xss")]
        assert ids == org_a
        # A non-admin key sees its own user's traces only, as ProviderTraceService shows them.
        async with http.get(f"{base}/api/traces", headers=auth(c.user_key)) as r:
            assert [t["id"] for t in (await r.json())["traces"]] == [c.traces["user"]]
        async with http.get(f"{base}/api/traces/{c.traces['xss']}", headers=auth(c.user_key)) as r:
            assert r.status == 404
        # Another organization's trace id: NOT_FOUND, as if it did not exist.
        async with http.get(f"{base}/api/traces/{c.traces['other-org']}", headers=auth(c.admin_key)) as r:
            assert r.status == 404
        async with http.get(f"{base}/traces/{c.traces['other-org']}", headers=auth(c.admin_key)) as r:
            assert r.status == 404
            assert "other-org-model" not in await r.text()
        async with http.get(f"{base}/api/traces/{c.traces['other-org']}", headers=auth(c.other_key)) as r:
            assert r.status == 200 and (await r.json())["model"] == "other-org-model"
        # The filters.
        async with http.get(
            f"{base}/api/traces",
            params={"model": "plain-model", "step_id": "step-plain-1"},
            headers=auth(c.admin_key),
        ) as r:
            assert [t["id"] for t in (await r.json())["traces"]] == [c.traces["plain-1"]]
        async with http.get(f"{base}/api/traces", params={"tag": "blue"}, headers=auth(c.admin_key)) as r:
            assert [t["id"] for t in (await r.json())["traces"]] == [c.traces["xss"]]
        async with http.get(f"{base}/api/traces", params={"status": "error"}, headers=auth(c.admin_key)) as r:
            assert (await r.json())["traces"] == []
        async with http.get(f"{base}/api/traces", params={"status": "bogus"}, headers=auth(c.admin_key)) as r:
            assert r.status == 400


async def test_login_cookie_and_csrf(tmp_path: Path, upstream: FakeUpstream) -> None:
    jar = aiohttp.CookieJar(unsafe=True)  # aiohttp keeps no cookie of an IP address otherwise
    async with console(tmp_path, upstream) as c, aiohttp.ClientSession(cookie_jar=jar) as http:
        base = f"http://127.0.0.1:{c.port}"
        # A login posted from another site's page is refused before the key is even looked at.
        async with http.post(
            f"{base}/login",
            data={"key": c.admin_key},
            headers={"Origin": "http://evil.example"},
            allow_redirects=False,
        ) as r:
            assert r.status == 403
            assert "llmgw_session" not in r.cookies
        async with http.post(
            f"{base}/login", data={"key": "wrong"}, headers={"Origin": base}, allow_redirects=False
        ) as r:
            assert r.status == 401
        async with http.post(
            f"{base}/login", data={"key": c.admin_key}, headers={"Origin": base}, allow_redirects=False
        ) as r:
            assert r.status == 303
            cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        assert c.admin_key not in cookie  # an opaque session id, never the key
        async with http.get(f"{base}/api/traces") as r:  # the jar sends the cookie
            assert r.status == 200 and len((await r.json())["traces"]) == 5
        # Logging out from another origin is refused; from ours it ends the session.
        async with http.post(
            f"{base}/logout", headers={"Origin": "http://evil.example"}, allow_redirects=False
        ) as r:
            assert r.status == 403
        async with http.get(f"{base}/api/traces") as r:
            assert r.status == 200
        async with http.post(f"{base}/logout", headers={"Origin": base}, allow_redirects=False) as r:
            assert r.status == 303
        async with http.get(f"{base}/api/traces") as r:
            assert r.status == 401


async def test_rebinding_and_static_traversal(tmp_path: Path, upstream: FakeUpstream) -> None:
    async with console(tmp_path, upstream) as c, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{c.port}"
        # A DNS-rebinding page reaches 127.0.0.1 with its own host name: refused.
        async with http.get(f"{base}/metrics", headers={"Host": f"evil.example:{c.port}"}) as r:
            assert r.status == 421
        async with http.get(f"{base}/metrics", headers={"Host": f"localhost:{c.port}"}) as r:
            assert r.status == 200
        for path in (
            "/static/..%2fserver.py",
            "/static/%2e%2e/server.py",
            "/static/../access.py",
            "/static/console.js%00",
        ):
            async with http.get(f"{base}{path}") as r:
                assert r.status == 404, path
        async with http.get(f"{base}/static/console.js") as r:
            assert r.status == 200
            assert r.headers["X-Content-Type-Options"] == "nosniff"
        async with http.get(f"{base}/login") as r:
            csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp


async def test_beyond_loopback_needs_an_admin_key(tmp_path: Path, upstream: FakeUpstream) -> None:
    async with console(tmp_path, upstream, admin_listen="0.0.0.0:0") as c, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{c.port}"
        async with http.get(f"{base}/metrics") as r:
            assert r.status == 401
        async with http.get(f"{base}/metrics", headers=auth(c.user_key)) as r:
            assert r.status == 403
        async with http.get(f"{base}/api/traces", headers=auth(c.user_key)) as r:
            assert r.status == 403
        async with http.post(
            f"{base}/login", data={"key": c.user_key}, headers={"Origin": base}, allow_redirects=False
        ) as r:
            assert r.status == 401
        async with http.get(f"{base}/metrics", headers=auth(c.admin_key)) as r:
            assert r.status == 200
        async with http.get(f"{base}/api/traces", headers=auth(c.admin_key)) as r:
            assert r.status == 200
