"""Data sets: command-line inputs, labels and label formats, labelled sets, tar shards, training
clips, packing, augmentation."""
