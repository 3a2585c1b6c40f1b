"""The harness core. Imports neither torch nor tensorflow at module level."""
