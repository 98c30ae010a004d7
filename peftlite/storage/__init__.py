"""Where bytes live: local directories and Hub repos (hub.py), written atomically (atomic.py); no LoRA here."""
