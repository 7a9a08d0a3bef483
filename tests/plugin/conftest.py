"""The plugin is tested the way pytest plugins are: pytester runs in subprocesses."""

pytest_plugins = ["pytester"]
