"""What ``maskrcnn predict`` writes for particular fields, beside its COCO results.

- ``labels``: microscopy: instance label images (TIFF) and per-object measurements (CSV).
- ``polygon_files``: masks as polygons: COCO polygon results, and GeoJSON per image (in the
  raster's CRS for a GeoTIFF, ``inference.geotiff``).
- ``writers``: the writers ``--labels``, ``--geojson`` and ``--polygons`` ask for.

Each writer has one interface, so ``predict`` drives them alike: ``targets(names)`` (the files
it will write, for the overwrite checks before any work), ``add(image_id, name, path, result)``
per finished image, ``close()`` once at the end; ``ours(path)`` tells a file an earlier run
wrote (which a new run replaces) from a user's own (which it never replaces). Tracking and line
counting, live sources, GeoTIFF windows and the input size live in ``inference/``: the
predictor and the video loop use them.
"""
