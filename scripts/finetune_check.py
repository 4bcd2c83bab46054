"""Fine-tuning and linear probing from a small pre-trained encoder against random init.

The check is experiments/finetune_check.py; this file keeps the documented command line.
"""

from experiments.finetune_check import main

if __name__ == "__main__":
    main()
