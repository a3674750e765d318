"""Alembic environment: the connection comes from :func:`dicom_node.database.migrate`.

The node runs migrations itself at start (``serve``, ``worker``, ``migrate``), on the
connection it already holds, inside the transaction that also holds the migration
lock; there is no ``alembic.ini`` and no URL here.
"""

from __future__ import annotations

from alembic import context

from dicom_node.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("the journal migrations run through dicom_node.database.migrate")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # ALTER TABLE through table copies
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
