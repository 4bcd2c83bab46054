"""The checkpoint layouts, one module each: the official fairseq `.pt`, Hugging Face folders, ours."""
