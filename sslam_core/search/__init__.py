"""Query by example over embedding stores: the store reader, exact and approximate nearest-neighbour
search, and the `Index` that answers audio or vectors with the nearest clips or segments."""
