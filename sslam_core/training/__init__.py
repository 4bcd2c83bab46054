"""Training: the trainer loop, optimiser, the pre-training objective (masking, mixing), fine-tuning."""
