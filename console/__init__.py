"""The operator console: a browser front end of the gateway admin API (docs/console.md)."""
