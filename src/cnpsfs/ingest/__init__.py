"""Importers: directory trees and tar streams (OCI layers, .deb data) into FileSets,
and the content writer that cuts file data into chunks.
"""
