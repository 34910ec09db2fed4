"""Health's hooks for shared cooldowns: what is sent to the other replicas, and `calm` coming
back once every cooldown is over, also those of units this replica never routes."""

from __future__ import annotations

from server.routing.health import Health


def test_only_a_lengthened_local_cooldown_is_shared() -> None:
    now = [100.0]
    health = Health(clock=lambda: now[0])
    sent: list[tuple[str, float]] = []
    health.on_cool = lambda unit, seconds: sent.append((unit, seconds))
    health.cool("chat/a", 30)
    health.cool("chat/a", 1)  # shorter: kept at 30, nothing sent
    health.cool("chat/b", 5, share=False)  # heard from another replica: not sent back
    now[0] += 10
    health.cool("chat/a", 25)  # 25 from now passes the 20 left: lengthened, sent
    assert sent == [("chat/a", 30.0), ("chat/a", 25.0)]
    assert health.cooling_until("chat/a") == 135.0


def test_calm_returns_when_every_cooldown_is_over_even_units_never_asked_about() -> None:
    now = [0.0]
    health = Health(clock=lambda: now[0])
    health.cool("other-route/x@another-org", 2, share=False)  # no call here ever asks about it
    health.cool("chat/a", 1)
    assert not health.calm()
    now[0] = 1.5
    assert not health.calm()
    now[0] = 2.0
    assert health.calm()
    assert health.cooling_until("other-route/x@another-org") == 0.0
