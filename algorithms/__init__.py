"""FL methods, one module each, registered by name under the `raysim.algorithms` entry points."""
