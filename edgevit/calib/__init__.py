"""Calibration sets as manifests: the same images for host-side quantization and the Jetson."""

from edgevit.calib.manifest import Manifest, build_manifest, load_manifest_images, read_manifest

__all__ = ["Manifest", "build_manifest", "load_manifest_images", "read_manifest"]
