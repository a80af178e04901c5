"""Alembic environment: the URL comes from the same settings as the service."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from pipeline.config import get_settings
from pipeline.db import create_engine, is_sqlite
from pipeline.schema import metadata

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = metadata


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url") or get_settings().database_url
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            sqlite = is_sqlite(conn)
            if sqlite:
                # A table recreate (batch_alter_table) with foreign keys on would
                # empty child tables through ON DELETE CASCADE, and the pragma is
                # ignored inside a transaction: turn it off before BEGIN.
                conn.connection.dbapi_connection.execute("PRAGMA foreign_keys = OFF")  # type: ignore[union-attr]
            context.configure(
                connection=conn,
                target_metadata=target_metadata,
                render_as_batch=sqlite,
                # SQLite can roll DDL back; Alembic's default for it is off.
                transactional_ddl=True,
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
            if sqlite:
                problems = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                conn.commit()
                if problems:
                    raise RuntimeError(f"foreign key violations after migration: {problems}")
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run them online")
run_migrations_online()
