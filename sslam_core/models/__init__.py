"""The model: the transformer, checkpoint layouts, the safe unpickler, hub access, loading, ONNX,
precision."""
