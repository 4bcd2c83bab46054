"""`python -m sslam_cli` runs the `sslam` command."""

from sslam_cli.main import app

app(prog_name="sslam")
