"""What long runs need: atomic outputs, journals, the HDF5 feature store, distributed helpers, interrupts."""
