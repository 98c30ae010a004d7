"""Files and the Hub: PEFT's key table, adapter directories, atomic writes, loading into a model."""
