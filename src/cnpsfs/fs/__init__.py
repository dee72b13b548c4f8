"""The FUSE layer: the pyfuse3 operations class (a thin adapter over the composed view),
the chunk fetcher, the mount service and daemon, its control socket, sd_notify and
writable overlays.

Nothing is imported here eagerly, so the control client (`cnpsfs status`) starts without
pyfuse3 and trio.
"""
