"""Job entry points and the default job config (`default.yaml`)."""
