"""ml-collections experiment configs: one `get_config(arg)` file per experiment."""
