"""Model-family adapters; the registry ("adapters" group) lists them."""
