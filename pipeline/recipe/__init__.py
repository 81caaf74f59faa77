"""The recipe schema: closed pydantic models, loaded and checked field by field."""
