"""All database access. Nothing else in the worker imports asyncpg: only this package does.

- `repository`: the pool (`Repository`): transactions, snapshots, cluster-wide locks,
  one-off statements;
- `session`: one connection in one transaction (`Session`): named queries and the
  set-based writes of signals and license changes;
- `errors`: what an error means (retry, reject the data, or fix the configuration);
- `wait`: the outage probe, and waiting for Postgres after a transient error;
- `migrations`: the migration runner; `roles`: the service's roles and their setup;
- `sql_files`: finds the SQL (named queries in sql/queries/, migrations, role setup).
"""
