"""The trained encoder as a service: splat-file bytes in, embeddings and zero-shot classes out, as an
MLflow model (`pyfunc`) and as a Ray Serve deployment (`app`)."""
