"""The `slos-serve` command: subcommands and the process launcher of `up`."""
