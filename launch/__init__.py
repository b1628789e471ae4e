"""Launch helpers and configs (``launch/configs/<model>_<data>.toml``)."""
