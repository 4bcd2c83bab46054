"""`python -m sslam_cli` runs the `sslam` command."""

from sslam_cli.main import main

main()
