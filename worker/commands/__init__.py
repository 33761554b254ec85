"""The CLI's command groups, each registered on `worker.cli.main`."""
