"""OCI: runtime bundles today; image import and export.
"""
