"""Running a model over files: windows, decoding workers, the batched pipeline, tagging, events,
embeddings."""
