"""Work done once across every process sharing the database: a row in
`periodic_runs` per job, claimed by a conditional UPDATE (or the INSERT that
creates it), so of several replicas exactly one wins a given period's run
(the daily drill reminder, the alert of a policy file every replica refuses)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from .schema import periodic_runs


async def claim_run(conn: AsyncConnection, name: str, now: datetime, period: timedelta) -> bool:
    """Claim this period's run of job `name`: True for one caller across every process
    (a conditional UPDATE of its row, or the INSERT that creates it)."""
    done = await conn.execute(
        update(periodic_runs)
        .where(and_(periodic_runs.c.name == name, periodic_runs.c.last_run_at <= now - period))
        .values(last_run_at=now))
    if done.rowcount == 1:
        return True
    exists = await conn.scalar(select(func.count()).where(periodic_runs.c.name == name))
    if exists:
        return False
    dialect = conn.dialect.name
    if dialect in ("sqlite", "postgresql"):
        insert_ = sqlite_insert if dialect == "sqlite" else pg_insert
        created = await conn.execute(insert_(periodic_runs).values(name=name, last_run_at=now)
                                     .on_conflict_do_nothing(index_elements=["name"]))
    else:  # pragma: no cover - the two supported databases are above
        created = await conn.execute(insert(periodic_runs).values(name=name, last_run_at=now))
    return bool(created.rowcount == 1)
