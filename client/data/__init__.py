"""Private voice data on the device: list files, checks, features, the cache, datasets.

Recordings are opened read-only and never leave the device; everything derived from them stays
in the feature cache folder chosen by the owner.
"""
