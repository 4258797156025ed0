"""Device-side tooling: TensorRT (imported only where used, so CPU-only machines import edgevit)."""
