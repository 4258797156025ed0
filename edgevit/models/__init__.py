"""Model definitions edgevit ships itself."""
