"""The image layer: manifests, the composed view of an image's layers, generations and
swap preparation, the file reader, tree walks and diffs. Pure Python over a store; no FUSE.
"""
