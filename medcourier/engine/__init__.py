"""The core: document model, config, plugins, store, broker, router, worker, HTTP API, CLI."""
