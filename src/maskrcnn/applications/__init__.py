"""Applications built on the predictor, and what ``maskrcnn predict`` writes for particular fields.

- ``tracking``, ``live``, ``speed``: traffic video: objects followed and counted across frames,
  live sources that drop frames rather than fall behind, the input size that sets the speed.
- ``labels``: microscopy: instance label images (TIFF) and per-object measurements (CSV).
- ``polygon_files``: masks as polygons: COCO polygon results, and GeoJSON per image.
- ``geo``: GeoTIFF inputs read window by window, and their map coordinates.

Each per-image writer has one interface, so ``predict`` drives them alike: ``targets(names)``
(the files it will write, for the overwrite checks before any work), ``add(image_id, name,
path, result)`` per finished image, ``close()`` once at the end; ``ours(path)`` tells a file an
earlier run wrote (which a new run replaces) from a user's own (which it never replaces).
"""
