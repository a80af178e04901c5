"""The fault-injection proxy in front of a real PostgreSQL (PIPELINE_TEST_POSTGRES_URL)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tests.pgproxy import PgFaultProxy

POSTGRES_URL = os.environ.get("PIPELINE_TEST_POSTGRES_URL")

pytestmark = pytest.mark.skipif(
    not POSTGRES_URL, reason="PIPELINE_TEST_POSTGRES_URL names no PostgreSQL server"
)


@pytest.fixture
def direct() -> Iterator[Engine]:
    assert POSTGRES_URL is not None
    engine = sa.create_engine(POSTGRES_URL, poolclass=sa.NullPool)
    yield engine
    engine.dispose()


@pytest.fixture
def proxy(direct: Engine) -> Iterator[PgFaultProxy]:
    host, port = direct.url.host or "127.0.0.1", direct.url.port or 5432
    with PgFaultProxy((host, port)) as proxy:
        yield proxy


@pytest.fixture
def proxied(proxy: PgFaultProxy) -> Iterator[Engine]:
    assert POSTGRES_URL is not None
    engine = sa.create_engine(proxy.url(POSTGRES_URL), poolclass=sa.NullPool)
    yield engine
    engine.dispose()


@pytest.fixture
def table(direct: Engine) -> Iterator[str]:
    name = f"pgproxy_{uuid.uuid4().hex}"
    with direct.begin() as conn:
        conn.exec_driver_sql(f'CREATE TABLE "{name}" (id integer PRIMARY KEY)')
    yield name
    with direct.begin() as conn:
        conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{name}"')


def test_queries_pass_through(proxied: Engine, table: str) -> None:
    """Statements and transactions work through the proxy as they do directly."""
    with proxied.begin() as conn:
        conn.execute(sa.text(f'INSERT INTO "{table}" (id) VALUES (:id)'), [{"id": 1}, {"id": 2}])
    with proxied.connect() as conn:
        assert conn.execute(sa.text(f'SELECT sum(id) FROM "{table}"')).scalar() == 3
        assert conn.execute(sa.text("SELECT repeat('x', 200000)")).scalar() == "x" * 200000


def test_dropped_commit_ack_fails_the_client_but_commits(
    proxy: PgFaultProxy, proxied: Engine, direct: Engine, table: str
) -> None:
    """A victim's COMMIT raises a disconnect error although the server committed it."""
    marker = f"drop-commit-ack-{uuid.uuid4().hex}"
    proxy.arm_drop_commit_ack(marker)
    with proxied.connect() as bystander, proxied.connect() as victim:
        bystander.execute(sa.text(f'INSERT INTO "{table}" (id) VALUES (1)'))
        bystander.commit()  # no marker: its COMMIT is acknowledged
        victim.execute(sa.text(f"SELECT '{marker}'"))
        victim.execute(sa.text(f'INSERT INTO "{table}" (id) VALUES (2)'))
        with pytest.raises(sa.exc.DBAPIError) as raised:
            victim.commit()
        assert raised.value.connection_invalidated
        assert isinstance(raised.value, sa.exc.OperationalError)
    assert proxy.commit_dropped.wait(5)
    with direct.connect() as conn:
        ids = conn.execute(sa.text(f'SELECT id FROM "{table}" ORDER BY id')).scalars().all()
    assert ids == [1, 2]
    with proxied.begin() as conn:  # disarmed after one drop
        conn.execute(sa.text(f"SELECT '{marker}'"))
        conn.execute(sa.text(f'INSERT INTO "{table}" (id) VALUES (3)'))


def test_kill_all_breaks_open_connections(proxy: PgFaultProxy, proxied: Engine) -> None:
    """After kill_all an open connection's next statement fails as a disconnect."""
    with proxied.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        proxy.kill_all()
        with pytest.raises(sa.exc.DBAPIError) as raised:
            conn.execute(sa.text("SELECT 1"))
        assert raised.value.connection_invalidated
    with proxied.connect() as conn:  # the proxy still accepts new connections
        assert conn.execute(sa.text("SELECT 2")).scalar() == 2
