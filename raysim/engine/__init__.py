"""The Ray side of raysim: driver, server actor and client workers."""
