"""Alembic environment: always given a live connection by bot.store.migrate.

Migrations run inside the caller's transaction, which holds the migration lock
(SQLite's write lock, or a PostgreSQL advisory lock), so replicas that start at
the same moment take turns instead of racing on CREATE TABLE.
"""

from alembic import context

from bot.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `breakglass db upgrade`, not the alembic command")

context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite",
                  transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
