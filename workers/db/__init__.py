"""Persistence: SQLAlchemy models, engine, and the outcome repository."""
