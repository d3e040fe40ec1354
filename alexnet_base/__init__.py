"""What every stage shares and nothing else: the user-facing error type, atomic file writes and
the configuration of every command (torch-free and DALI-free, so `--help` stays instant)."""
