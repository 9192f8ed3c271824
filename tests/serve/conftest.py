# helper B (issue 31b): a real PostgreSQL server for the store and fault tests (tests/serve/pg_fixtures.py)
from pg_fixtures import pg_dsn, postgres_server  # noqa: F401
