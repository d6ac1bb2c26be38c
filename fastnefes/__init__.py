"""fastnefes: fast neural feature fields for camera pose refinement."""

__version__ = "0.1.0"
# Bumped whenever the run-directory format changes incompatibly; runs record it in config.json.
RUN_FORMAT_VERSION = 1
