"""The core's shapes: pydantic schemas, SQLAlchemy tables, the status machines, migrations."""
