"""Alembic migrations of the journal (SQLite and PostgreSQL); run by :mod:`dicom_node.database`."""
