"""What every stage shares: the config and its schema, errors, logging, atomic writes, reading files."""
