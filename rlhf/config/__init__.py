"""The run's schema, its validation, the command-line guard and secret redaction."""
