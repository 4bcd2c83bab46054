"""Does search find what it should? Same-digit retrieval on FSDD, pre-trained against random init.

The check is experiments/search_check.py; this file keeps the documented command line.
"""

from experiments.search_check import main

if __name__ == "__main__":
    main()
